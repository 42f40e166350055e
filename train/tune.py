"""Hyper-parameter search with Optuna on a wall-clock budget: learning rate, tokens per step, dropout,
warmup, Adam's beta2, (for a recipe with short-then-long windows) the short part of the budget, and
optionally the model's shape among presets.

The best trial's trained model is kept (`model_dir_for(out)`, e.g. runs/tuned.toml -> runs/tuned/): each
finished trial replaces it there if it beats the one already there, so an interrupted search keeps its
best hour of training, and at the end that model is scored on the whole validation split (trials compare
on the recipe's `eval_windows` evenly spaced windows, which for nima-1m read ~0.1 bits/char higher than
the whole split; the whole split is what every other figure in train/README uses).

The first trial is the base recipe itself (snapped to the search space): few trials fit a long budget, and
a search of them should not end worse than the recipe it started from (six 5-minute trials from scratch
found 2.595 bits/char where the hand-found nima-1m recipe reaches 2.446-2.491). `jobs` runs trials in
that many processes at once, sharing one Optuna journal (an hour-long trial per core, not per machine).

Each trial trains for the same wall-clock slice (the cosine decays over that slice) and reports its
validation loss at fixed fractions of that slice, so the median pruner compares trials at equal time
spent, which is what the search optimizes. (Comparing at equal data seen, as this did before, favours
whatever is slow per token: a larger preset is ahead at any token count and a small one gets pruned
before its extra tokens show.) The best trial's settings are written as a recipe.
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

from nima_edge.atomic import atomic_dir, write_text
from nima_edge.config import PRESETS
from nima_edge.errors import NimaError
from nima_edge.train import recipe
from nima_edge.train.recipe import TrainConfig
from nima_edge.train.trainer import train

# Tokens per optimizer step, not rows: the same choices at every context. At 5-10 minutes on a CPU the
# winners sit at the small end (nima-1m: 1,024 tokens per step beat 2,048 by 0.05-0.1 bits/char), where
# the old row counts (8-64 rows of 256 = 2,048-16,384 tokens) could not reach.
STEP_TOKENS = (512, 1024, 2048, 4096)
EVALS_PER_TRIAL = 6  # evaluations per trial, and the pruner's time buckets
# The rest of the space (suggest() draws from it; start_params() snaps the base recipe onto it).
LR = (1e-3, 3e-2)  # log scale
DROPOUT = (0.0, 0.2)
WARMUP_STEPS = (0, 200, 25)  # low, high, step
BETA2 = (0.95, 0.99)
SHORT_FRACTION = (0.5, 0.95, 0.05)
TUNE_RECORD = "tune.json"  # in the kept model's directory: which search and trial it is, and its loss


def model_dir_for(out: str | Path) -> Path:
    """Where a search keeps its best trial's trained model: the recipe's path without `.toml`."""
    out = Path(out)
    return out.with_suffix("") if out.suffix == ".toml" else out.with_name(out.name + "-model")


def tune_record(model_dir: str | Path) -> dict | None:
    """The kept model's record (search, trial, val_loss), or None for a directory tune did not write."""
    try:
        return json.loads((Path(model_dir) / TUNE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lock_for(model_dir: Path) -> Path:
    """The lock file beside the kept model that serializes the workers' compare-and-swap."""
    return model_dir.with_name(f".{model_dir.name}.lock")


def _keep_if_best(run_dir: Path, model_dir: Path, search: str, trial: int, loss: float) -> None:
    """Copy a finished trial's run into `model_dir` if it beats what this search put there. Workers finish
    trials concurrently, so the compare-and-swap holds a lock file beside the directory."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_for(model_dir), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = tune_record(model_dir)
        if held and held.get("search") == search and held["val_loss"] <= loss:
            return
        with atomic_dir(model_dir) as tmp:
            shutil.copytree(run_dir, tmp, dirs_exist_ok=True)
            (tmp / TUNE_RECORD).write_text(json.dumps({"search": search, "trial": trial, "val_loss": loss}) + "\n")


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise NimaError("nima-edge tune needs optuna", "pip install 'nima-edge[train]'") from e
    return optuna


def rows_per_step(step_tokens: int, context: int, grad_accum: int = 1) -> int:
    """Rows per optimizer step for about `step_tokens` tokens at `context` (a multiple of grad_accum)."""
    rows = max(1, step_tokens // context)
    return max(grad_accum, rows - rows % grad_accum)


def batch_sizes(base: TrainConfig) -> list[int]:
    """The rows per step the search chooses from: STEP_TOKENS at the base recipe's context."""
    return sorted({rows_per_step(t, base.context, base.grad_accum) for t in STEP_TOKENS})


def for_preset(base: TrainConfig, preset: str) -> TrainConfig:
    """`base` with `preset`'s shape, trained at every position that preset declares."""
    if preset not in PRESETS:
        raise NimaError(f"tune: {preset!r} is not a known preset", f"choose among: {', '.join(PRESETS)}")
    return TrainConfig(**{**base.to_dict(), "preset": preset,
                          "context": PRESETS[preset]["max_position_embeddings"]}).validate()


def suggest(trial, base: TrainConfig, trial_seconds: float, evals_every: dict[str, int],
            presets: tuple[str, ...] = ()) -> TrainConfig:
    """The trial's settings: the searched values on top of `base`, timed to `trial_seconds`.

    `evals_every` maps each preset to the tokens between evaluations (EVALS_PER_TRIAL per trial at its
    measured speed); `presets`, two or more, makes the shape a searched choice too."""
    cfg = for_preset(base, trial.suggest_categorical("preset", list(presets))) if len(presets) > 1 else base
    lr = trial.suggest_float("lr", *LR, log=True)
    batch = rows_per_step(trial.suggest_categorical("step_tokens", list(STEP_TOKENS)), cfg.context, cfg.grad_accum)
    short = {"short_fraction": trial.suggest_float("short_fraction", *SHORT_FRACTION[:2], step=SHORT_FRACTION[2])
             } if cfg.short_context else {}
    return TrainConfig(**{
        **cfg.to_dict(), "lr": lr, "min_lr": lr / 10, "batch_size": batch,
        "dropout": trial.suggest_float("dropout", *DROPOUT),
        "warmup_steps": trial.suggest_int("warmup_steps", *WARMUP_STEPS[:2], step=WARMUP_STEPS[2]),
        "beta2": trial.suggest_categorical("beta2", list(BETA2)), **short,
        "max_seconds": trial_seconds, "max_steps": 10 ** 9, "schedule": "cosine", "schedule_clock": "time",
        "eval_every": max(1, evals_every[cfg.preset] // (batch * cfg.context)), "patience": 0, "mlflow": False,
    }).validate()


def start_params(base: TrainConfig, presets: tuple[str, ...] = ()) -> dict:
    """The base recipe as a point of the search space, each value snapped to the nearest one the space
    holds: the search's first trial."""
    def snap(value, low, high, step):
        return low + round((min(max(value, low), high) - low) / step) * step

    params = {"lr": min(max(base.lr, LR[0]), LR[1]),
              "step_tokens": min(STEP_TOKENS, key=lambda t: abs(t - base.batch_size * base.context)),
              "dropout": min(max(base.dropout, DROPOUT[0]), DROPOUT[1]),
              "warmup_steps": int(snap(base.warmup_steps, *WARMUP_STEPS)),
              "beta2": min(BETA2, key=lambda b: abs(b - base.beta2))}
    if base.short_context:
        params["short_fraction"] = round(snap(base.short_fraction, *SHORT_FRACTION), 2)
    if len(presets) > 1:
        params["preset"] = base.preset if base.preset in presets else presets[0]
    return params


def pruning_step(cfg: TrainConfig, elapsed_s: float, trial_s: float) -> int | None:
    """The pruner's step for an evaluation `elapsed_s` into a trial: the share of the slice spent, in
    EVALS_PER_TRIAL buckets (trials of any speed line up), or None while the trial still trains on short
    windows and for one bucket after. Validation is scored at the full context, where a short-window phase
    leaves positions untrained: its loss says little, and comparing it would prune the trials with the most
    short windows. Just after the switch the loss is still falling fast (3.2 to 1.54 nats within ~300 steps
    in an hour-long nima-1m run), so the bucket after it does not count either: without it, both 80%-short
    trials of a 60-minute search were pruned 8-9 minutes after their switch, against a 50%-short trial
    25 minutes past its own."""
    if cfg.short_context and elapsed_s < (cfg.short_fraction + 1 / EVALS_PER_TRIAL) * trial_s:
        return None
    return min(EVALS_PER_TRIAL, int(elapsed_s / trial_s * EVALS_PER_TRIAL))


def _objective(trial, data_dir, base: TrainConfig, trial_s: float, evals_every: dict, presets: tuple,
               model_dir: Path, search: str) -> float:
    """Train one trial's settings for `trial_s`; report at equal shares of its time; keep its model if it is
    the best so far; its best val loss."""
    optuna = _optuna()
    trial.set_user_attr("pid", os.getpid())  # which worker ran it (pruned or not)
    cfg = suggest(trial, base, trial_s, evals_every, presets)
    reported = set()

    def report(step: int, metrics: dict) -> None:
        bucket = pruning_step(cfg, metrics["elapsed_s"], trial_s)
        if bucket is None or bucket in reported:
            return
        reported.add(bucket)
        trial.report(metrics["loss"], step=bucket)
        if bucket < EVALS_PER_TRIAL and trial.should_prune():  # a finished trial keeps its result
            raise optuna.TrialPruned()

    with tempfile.TemporaryDirectory(prefix="nima-tune-") as tmp:
        summary = train(data_dir, tmp, cfg, log=lambda *_: None, on_eval=report, progress_bar=False)
        _keep_if_best(Path(tmp), model_dir, search, trial.number, summary["best"]["loss"])
    trial.set_user_attr("steps", summary["steps"])
    return summary["best"]["loss"]


def _progress(log):
    def callback(study, trial) -> None:
        state = _optuna().trial.TrialState
        value = "pruned" if trial.state == state.PRUNED else f"val loss {trial.value:.4f}"
        log(f"trial {trial.number}: {value}  {trial.params}")
    return callback


def _storage(journal: Path):
    optuna = _optuna()
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _search(journal: Path, name: str, seed: int, pruner, deadline: float, objective, log=print) -> None:
    """One worker: trials from the shared study until `deadline` (time.monotonic(), system-wide)."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=_storage(journal),
                              sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    # Optuna's timeout only stops *starting* trials; the deadline leaves room for the last one to finish.
    study.optimize(objective, timeout=max(deadline - time.monotonic(), 1e-3), callbacks=[_progress(log)], catch=())


def _worker(threads: int | None, *args) -> None:
    """A spawned worker process: its own thread count, then trials."""
    _set_threads(threads)
    _search(*args, log=partial(print, flush=True))


def tune(data_dir: str | Path, out: str | Path, base: TrainConfig, budget_s: float, trial_s: float,
         seed: int = 0, log=print, pruner=None, presets: tuple[str, ...] = (), jobs: int = 1,
         threads: int | None = None) -> dict:
    """Search for `budget_s` seconds in trials of `trial_s`; write the best recipe to `out`; return its figures.

    `presets` (two or more) adds the model's shape to the search; each trains at its declared context.
    `pruner` defaults to Optuna's median pruner (after two complete trials, stop a trial whose loss is
    worse than the median of earlier trials at the same fraction of the slice, from the third on).
    `jobs` trials run at once, each in its own process with `threads` torch threads (default: this
    machine's cores shared out among them). The best trial's model is kept in `model_dir_for(out)`."""
    optuna = _optuna()
    if trial_s <= 0 or budget_s < trial_s:
        raise NimaError(f"a tuning budget of {budget_s:.0f} s does not fit one trial of {trial_s:.0f} s",
                        "give --minutes at least --trial-minutes (several trials make a search)")
    if jobs < 1:
        raise NimaError(f"--jobs {jobs}: a search needs at least one process", "use --jobs 1 or more")
    if jobs > 1 and threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    _set_threads(threads)  # before the speed probe too: it sizes evaluations for trials at this thread count
    presets = tuple(dict.fromkeys(presets))
    shapes = [for_preset(base, p) for p in presets] if len(presets) > 1 else [base]
    evals_every = {c.preset: max(1, round(_tokens_in(trial_s, data_dir, c) / EVALS_PER_TRIAL)) for c in shapes}
    model_dir, search = model_dir_for(out), uuid.uuid4().hex
    objective = partial(_objective, data_dir=data_dir, base=base, trial_s=trial_s, evals_every=evals_every,
                        presets=presets, model_dir=model_dir, search=search)
    # steps are time buckets; the first two (warmup still shaping them) never prune
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    start = time.monotonic()
    deadline = start + max(budget_s - trial_s, 1e-3)
    with tempfile.TemporaryDirectory(prefix="nima-tune-") as tmp:
        journal = Path(tmp) / "study.journal"  # every worker's trials, for the sampler and the pruner
        study = optuna.create_study(study_name="tune", storage=_storage(journal), direction="minimize")
        study.enqueue_trial(start_params(base, presets), user_attrs={"base_recipe": True})
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        workers = [spawn.Process(target=_worker, daemon=True,
                                 args=(threads, journal, "tune", seed + i, pruner, deadline, objective))
                   for i in range(1, jobs)]
        try:
            for w in workers:
                w.start()
            _search(journal, "tune", seed, pruner, deadline, objective, log=log)
            for w in workers:
                w.join()
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()
                    w.join()
            _lock_for(model_dir).unlink(missing_ok=True)  # no worker left to take it, failed or not
        if failed := [w.exitcode for w in workers if w.exitcode]:
            raise NimaError(f"{len(failed)} tuning worker(s) failed (exit code {failed[0]}); the error is above",
                            "fix what it names, or run with --jobs 1 to see it in this process")
        trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise NimaError("no tuning trial completed within the budget", "give --minutes more time")
    best = min(done, key=lambda t: t.value)
    cfg = suggest(optuna.trial.FixedTrial(best.params), base, trial_s, evals_every, presets)
    base_trial = [t for t in done if t.user_attrs.get("base_recipe")]
    whole = _score_whole_split(model_dir, data_dir, search)
    figures = {"val_loss": round(best.value, 4), "val_windows": cfg.eval_windows,
               "val_bits_per_char": round(whole["bits_per_char"], 4), "val_loss_whole_split": round(whole["loss"], 4),
               "model": str(model_dir), "best_trial": best.number,
               "steps": best.user_attrs["steps"], "trial_seconds": trial_s, "trials": len(trials),
               "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials), "jobs": jobs,
               "processes": len({t.user_attrs["pid"] for t in trials if "pid" in t.user_attrs}),
               "best_is_base_recipe": bool(best.user_attrs.get("base_recipe")),
               **({"base_recipe_val_loss": round(base_trial[0].value, 4)} if base_trial else {}),
               "search_seconds": round(time.monotonic() - start), "data": str(data_dir),
               **({"presets_searched": list(presets)} if len(presets) > 1 else {})}
    write_text(out, recipe.dumps(cfg, measured=figures, header=(
        f"Tuned by nima-edge tune: best of {figures['trials']} trials ({figures['pruned']} pruned),\n"
        f"each {trial_s:.0f} s of training; val loss {figures['val_loss']} nats/token on {cfg.eval_windows} windows\n"
        f"({figures['val_loss_whole_split']} on the whole split, {figures['val_bits_per_char']} bits/char).\n"
        f"Its trained model: {model_dir}")))
    log(f"best trial {best.number}: val loss {best.value:.4f}  {best.params} -> {out}, model {model_dir} "
        f"({whole['bits_per_char']:.4f} bits/char on the whole validation split)")
    return figures


def _score_whole_split(model_dir: Path, data_dir, search: str) -> dict:
    """The kept model (this search's best) on every window of the validation split at its trained context."""
    from nima_edge.checkpoint import load, trained_context
    from nima_edge.data import TokenData
    from nima_edge.evaluate import evaluate
    if (tune_record(model_dir) or {}).get("search") != search:
        raise NimaError(f"the search's best model is missing from {model_dir}", "run the search again")
    model, _ = load(model_dir)
    return evaluate(model, TokenData(data_dir), context=trained_context(model_dir, model))


def _tokens_in(seconds: float, data_dir, cfg: TrainConfig) -> float:
    """Training tokens a trial of `seconds` will see, from a short timed run (a rough figure is enough)."""
    with tempfile.TemporaryDirectory(prefix="nima-tune-") as tmp:
        probe = {**cfg.to_dict(), "batch_size": max(batch_sizes(cfg)), "grad_accum": 1, "max_steps": 5, "max_seconds": None,
                 "schedule_clock": "steps", "eval_every": 10 ** 6, "eval_windows": 1, "mlflow": False}
        s = train(data_dir, tmp, TrainConfig(**probe), log=lambda *_: None, progress_bar=False)
    return s["tokens_per_second"] * seconds
