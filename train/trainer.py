"""The training loop: one CPU, one GPU or several processes (torchrun + DDP).

Per optimizer step: the learning rate from the schedule, `grad_accum` micro-batches per process
(autocast where asked), gradient clipping, one optimizer step. Every `eval_every` steps: validation
loss / perplexity / bits per character, the best model published to OUT, early stopping. Resumable
checkpoints go to OUT/last (see checkpointing.py for the layout).

What is trained on what is a `Job`: `PretrainJob` (a fresh model of the preset on random windows of
a prepared corpus) here; fine-tuning (train/finetune.py) brings its own job to the same loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn

from nima_edge import checkpoint
from nima_edge.atomic import write_text
from nima_edge.config import preset
from nima_edge.data import TokenData
from nima_edge.errors import NimaError
from nima_edge.evaluate import evaluate, windows
from nima_edge.model import NimaForCausalLM
from nima_edge.tokenizer import Tokenizer
from nima_edge.train import checkpointing, distributed, optim, qat, recipe
from nima_edge.train.recipe import TrainConfig
from nima_edge.train.schedules import lr_at
from nima_edge.train.tracking import Tracker

__all__ = ["TrainConfig", "train", "batch_starts", "Job", "PretrainJob"]


def batch_starts(seed: int, step: int, n_tokens: int, context: int, batch_size: int) -> np.ndarray:
    """Window starts of the global batch of `step`: a pure function of (seed, step), so a resumed or
    data-parallel run draws exactly the batches a single uninterrupted process would."""
    return np.random.default_rng([seed, step]).integers(0, n_tokens - context, batch_size)


class Job:
    """The model the loop trains, the data it draws batches from, and how it is evaluated and saved.

    The loop owns everything else (schedule, optimizer, accumulation, DDP, budgets, early stopping,
    resume): a job only answers these questions. Batches must be pure functions of (seed, step), so
    resumed and data-parallel runs draw exactly what one uninterrupted process would.
    """

    tokenizer: Tokenizer

    def check(self, cfg: TrainConfig) -> None:
        """Raise NimaError when the data cannot feed `cfg`."""

    def describe(self) -> str:
        """What is trained on, for the start line (e.g. "1,000,000 training tokens")."""
        return ""

    def build_model(self, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
        raise NotImplementedError

    def restore(self, model: torch.nn.Module, last: Path, device: torch.device) -> None:
        """Load the weights saved in OUT/last (by `resumable`) into `model`."""
        weights, _ = checkpoint.load(last, device=str(device))
        model.load_state_dict(weights.state_dict())

    def draw(self, cfg: TrainConfig, step: int) -> np.ndarray:
        """The global batch of `step` as `batch_size` item indices (a pure function of seed and step)."""
        raise NotImplementedError

    def loss(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch: the model's cross-entropy on the targets."""
        return net(x, y)[1]

    def rows(self, cfg: TrainConfig, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of some drawn items; targets of -100 carry no loss."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, cfg: TrainConfig) -> dict:
        """Validation metrics with at least loss, perplexity, bits_per_char and tokens."""
        raise NotImplementedError

    def publishable(self, model: torch.nn.Module) -> tuple[NimaForCausalLM, dict[str, bytes], dict]:
        """(the model to ship, extra files beside it by relative path, extra nima.json metadata)."""
        return model, {}, {}

    def resumable(self, model: torch.nn.Module) -> tuple[NimaForCausalLM, dict[str, bytes]]:
        """(a checkpointable model, extra files) that `restore` rebuilds the training state from."""
        return model, {}


class PretrainJob(Job):
    """Pretraining: a fresh model of the preset on windows of a prepared corpus, drawn at random."""

    def __init__(self, data_dir: str | Path):
        self.data = TokenData(data_dir)
        self.tokenizer, self.tokens = self.data.tokenizer, self.data.tokens("train")

    def check(self, cfg: TrainConfig) -> None:
        if len(self.tokens) <= cfg.context:
            raise NimaError(f"{self.data.dir} has {len(self.tokens)} training tokens, fewer than one window of "
                            f"{cfg.context}", "use a larger corpus or a shorter context")
        if (val := len(self.data.tokens("val"))) < cfg.context:  # no window: no honest validation loss
            raise NimaError(f"{self.data.dir} has {val} validation tokens, fewer than one window of {cfg.context}",
                            "prepare the data with a larger --val-fraction, or train with a shorter --context")

    def describe(self) -> str:
        return f"{len(self.tokens):,} training tokens"

    def build_model(self, cfg: TrainConfig, device: torch.device) -> NimaForCausalLM:
        return NimaForCausalLM(preset(cfg.preset, vocab_size=self.tokenizer.vocab_size, dropout=cfg.dropout)).to(device)

    def draw(self, cfg: TrainConfig, step: int) -> np.ndarray:
        return batch_starts(cfg.seed, step, len(self.tokens), cfg.context, cfg.batch_size)

    def rows(self, cfg: TrainConfig, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.tokens, self.tokenizer.bos_id, cfg.context, items)

    def evaluate(self, model: torch.nn.Module, cfg: TrainConfig) -> dict:
        return evaluate(model, self.data, context=cfg.context, max_windows=cfg.eval_windows)

    def resumable(self, model: torch.nn.Module) -> tuple[NimaForCausalLM, dict[str, bytes]]:
        return model, {DATA_FILE: (json.dumps(data_record(self.data), indent=1) + "\n").encode()}


DATA_FILE = "data.json"  # in OUT/last: which prepared data the run trains on, so --resume needs no --data


def data_record(data: TokenData) -> dict:
    """Where the data is and what it holds (the splits' hashes): a moved copy is the same data."""
    return {"data": str(data.dir.resolve()), **{split: data.meta[split].get("sha256") for split in ("train", "val")}}


def resumed_data(out: Path, data_dir: str | Path | None) -> Path:
    """The data a resumed pretraining run continues on: the one it recorded, or `data_dir` if that holds
    the same text; a run from before the record needs `data_dir`."""
    last = checkpointing.last_dir(out)
    record_path = last / DATA_FILE if last else None
    if record_path is None or not record_path.is_file():
        if data_dir is None:
            raise NimaError(f"{out} does not record its training data (an older run)", "pass --data DIR to --resume")
        return Path(data_dir)
    record = json.loads(record_path.read_text())
    if data_dir is None:
        return Path(record["data"])
    given = data_record(TokenData(data_dir))
    if {k: given[k] for k in ("train", "val")} != {k: record[k] for k in ("train", "val")}:
        raise NimaError(f"--data {data_dir} holds other text than the run in {out} trained on ({record['data']})",
                        "drop --data to continue on the run's own data, or start a new run")
    return Path(data_dir)


def _precision(cfg: TrainConfig, device: torch.device):
    """(the precision trained in: fp32, bf16 or fp16; autocast context factory; GradScaler or None)."""
    p = cfg.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if p == "fp32":
        return p, contextlib.nullcontext, None
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    # fp16 has too little range for raw gradients: scale the loss (bf16 has fp32's range and needs none)
    scaler = torch.amp.GradScaler(device.type) if p == "fp16" else None
    return p, (lambda: torch.autocast(device.type, dtype=dtype)), scaler


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving OUT/last."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopRequest:
    """While active, SIGINT/SIGTERM only set `signum`: the loop finishes its step, saves a resumable
    checkpoint and raises TrainingInterrupted. A second signal acts at once (the old handlers are back)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(rng: dict[str, torch.Tensor], rank: int, device: torch.device) -> bool:
    if f"cpu.{rank}" not in rng:
        return False
    torch.set_rng_state(rng[f"cpu.{rank}"])
    if device.type == "cuda" and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"], device)
    return True


# Settings a resumed run may change: its budget and bookkeeping, never what shapes the optimization so far.
RESUME_OVERRIDABLE = ("max_steps", "max_seconds", "patience", "log_every", "mlflow")


def _resolve_config(out: Path, cfg: TrainConfig | None, resume: bool, overrides: dict, log) -> tuple[TrainConfig, bool]:
    """The run's settings, and whether it resumes. A resumed run keeps the settings it started with,
    except for the budget-like RESUME_OVERRIDABLE ones in `overrides`."""
    if not resume:
        if cfg is None:
            raise NimaError("no training settings given", "pass a recipe (--recipe) or a TrainConfig")
        return TrainConfig(**{**cfg.to_dict(), **overrides}).validate(), False
    d = checkpointing.last_dir(out)
    if d is None:
        raise NimaError(f"--resume: {out} has no resumable checkpoint (no {out / checkpointing.LAST})",
                        "drop --resume to start a new run, or pass the --out of the run to continue")
    saved = TrainConfig(**checkpointing.read_state(d)["config"])
    fixed = sorted(k for k, v in overrides.items() if k not in RESUME_OVERRIDABLE and v != getattr(saved, k))
    if fixed:
        raise NimaError(f"a resumed run keeps its settings; cannot change {', '.join(fixed)}",
                        f"only {', '.join(RESUME_OVERRIDABLE)} may change on --resume; start a new run for others")
    if cfg is not None:
        ignored = [k for k, v in cfg.to_dict().items() if v != getattr(saved, k)]
        if ignored:
            log(f"resuming with the run's own settings; ignoring the new values of: {', '.join(ignored)}")
    return TrainConfig(**{**saved.to_dict(), **overrides}).validate(), True


def train(data_dir: str | Path | None, out_dir: str | Path, cfg: TrainConfig | None = None, log=print,
          resume: bool = False, on_eval: Callable[[int, dict], None] | None = None,
          overrides: dict | None = None, progress_bar: bool = True, job: Job | None = None) -> dict:
    """Train (or with `resume`, continue) a run in `out_dir`; returns the run summary.

    On return `out_dir` is an HF checkpoint of the best model on validation. `on_eval(step, metrics)`
    is called after each evaluation (the tuner prunes trials from it by raising). `overrides` are
    settings applied on top of `cfg`, or on top of the saved settings when resuming. The rich progress
    bar (loss, tokens/s, ETA) shows on the main process unless `progress_bar` is False. `job` replaces
    the default PretrainJob(data_dir) (fine-tuning passes its own).
    """
    out = Path(out_dir)
    cfg, resuming = _resolve_config(out, cfg, resume, overrides or {}, log)
    if resuming and job is None:
        data_dir = resumed_data(out, data_dir)
    dist = distributed.setup(cfg.device)
    try:
        return _run(job or PretrainJob(data_dir), out, cfg, dist, resuming, log if dist.main else (lambda *_: None),
                    on_eval, progress_bar and dist.main)
    finally:
        dist.close()


def _run(job: Job, out: Path, cfg: TrainConfig, dist: distributed.Dist, resuming: bool, log, on_eval,
         progress_bar: bool) -> dict:
    dev = dist.device
    per_step = cfg.grad_accum * dist.world
    if cfg.batch_size % per_step:
        raise NimaError(f"batch_size {cfg.batch_size} does not split into grad_accum {cfg.grad_accum} x "
                        f"{dist.world} process(es)", f"use a batch_size that is a multiple of {per_step}")
    tok = job.tokenizer
    job.check(cfg)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = job.build_model(cfg, dev)
    scheme = qat.parse(cfg.qat) if cfg.qat else None
    if scheme:
        qat.check_model(model, scheme)
    opt = optim.build(model, cfg)
    precision, autocast, scaler = _precision(cfg, dev)
    progress = {"step": 0, "elapsed": 0.0, "tokens": 0, "best_loss": math.inf, "best_step": None,
                "bad_evals": 0, "last_eval": None, "finished": None}
    if resuming:
        state, opt_tensors, rng, last = checkpointing.load_last(out, str(dev))
        job.restore(model, last, dev)
        checkpointing.optimizer_from_files(opt, opt_tensors, state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if not _set_rng_state(rng, dist.rank, dev):  # other world size: fresh, still deterministic, streams
            torch.manual_seed(cfg.seed + 1 + dist.rank + state["progress"]["step"])
        progress = state["progress"]
        log(f"resuming {out} at step {progress['step']} ({progress['elapsed']:.0f} s trained)")
        if _done_reason(progress, cfg):
            log(f"the run already finished ({_done_reason(progress, cfg)}); nothing to do")
            return checkpoint.read_meta(out).get("training", {})
        progress["finished"] = None  # a larger budget continues a finished run
    else:
        torch.manual_seed(cfg.seed + 1 + dist.rank)  # dropout streams differ per rank
    net = dist.wrap(model)
    net.train()

    tracker = Tracker(out, enabled=dist.main, mlflow=cfg.mlflow, params=cfg.to_dict(), resumed=resuming)
    if dist.main:
        for stale in out.glob(".publish.*"):  # left by a kill during publish
            shutil.rmtree(stale, ignore_errors=True)
        write_text(out / "recipe.toml", recipe.dumps(cfg, header=f"settings of the run in {out}"))
        tracker.log("resume" if resuming else "start", progress["step"], world=dist.world, device=str(dev),
                    precision=precision,
                    parameters=_count(model), trained_parameters=_count(model, trainable=True))
        log(f"{cfg.preset}: {_count(model):,} parameters ({_count(model, trainable=True):,} trained), "
            f"{job.describe()}, "
            + (f"QAT {scheme.name} over the last {cfg.qat_fraction:.0%}, " if scheme else "") +
            f"{dist.world} process(es) on {dev} ({precision}), global batch {cfg.batch_size} x {cfg.context} tokens")

    step_tokens = cfg.batch_size * cfg.context
    clock0 = time.monotonic() - progress["elapsed"]  # the budget counts time trained before a resume too
    elapsed = progress["elapsed"]
    session_tokens, session_train_s, first_step = 0, 0.0, progress["step"]
    params = [p for p in model.parameters() if p.requires_grad]
    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.fields[step]:,}"),
                   TextColumn("{task.fields[info]}"), disable=not progress_bar)
    try:
        with bar, StopRequest() as stop_request:
            task = bar.add_task("train", total=1.0, completed=run_fraction(progress, cfg), step=progress["step"],
                                info="")
            for step in range(progress["step"], cfg.max_steps):
                t_step = time.monotonic()
                frac = elapsed / cfg.max_seconds if cfg.schedule_clock == "time" else None
                lr = lr_at(step, cfg, frac)
                for group in opt.param_groups:
                    group["lr"] = lr
                if scheme:
                    _switch_on_qat(model, scheme, cfg, progress)
                window = window_at(cfg, step, elapsed)
                micro = window.batch_size // per_step
                items = job.draw(window, step)
                mine = items[dist.rank * micro * cfg.grad_accum:(dist.rank + 1) * micro * cfg.grad_accum]
                batches = [job.rows(window, mine[m * micro:(m + 1) * micro]) for m in range(cfg.grad_accum)]
                train_loss, grad_norm = _optimizer_step(net, opt, scaler, autocast, batches, params, cfg.grad_clip,
                                                        dist, dev, job.loss, _divisors(batches, dist))
                session_train_s += time.monotonic() - t_step
                session_tokens += step_tokens
                done = step + 1
                progress["step"], progress["tokens"] = done, progress["tokens"] + step_tokens

                # Rank 0's clock (and Ctrl-C) decides the budget, so every rank stops (and anneals) together.
                elapsed, stop_signal = dist.broadcast([time.monotonic() - clock0, float(stop_request.signum or 0)])
                progress["elapsed"] = elapsed
                out_of_time = cfg.max_seconds is not None and elapsed >= cfg.max_seconds
                finishing = "max_steps" if done == cfg.max_steps else "max_seconds" if out_of_time else None
                evaluating = done % cfg.eval_every == 0 or finishing is not None
                tok_s = session_tokens / max(session_train_s, 1e-9)
                if dist.main and (done % cfg.log_every == 0 or finishing):
                    tracker.log("train", done, loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tok_s,
                                elapsed_s=elapsed)
                metrics = None
                if evaluating:
                    stop = 0.0
                    if dist.main:
                        metrics = job.evaluate(model, cfg)
                        if window.context < cfg.context:  # short windows: also score what is being trained
                            metrics["window"] = {"context": window.context, **job.evaluate(model, window)}
                        stop = float(_after_eval(out, job, model, tok, cfg, progress, metrics, tracker, log,
                                                 train_loss))
                    if dist.broadcast([stop])[0] and finishing is None:
                        finishing = "early_stopping"
                if finishing:
                    progress["finished"] = finishing
                every = cfg.checkpoint_every or cfg.eval_every
                if finishing or done % every == 0:
                    rng = dist.gather(_rng_state(dev))
                    if dist.main:
                        _save_last(out, job, model, tok, opt, scaler, cfg, progress, rng)
                if stop_signal and not finishing:  # SIGINT/SIGTERM: leave a resumable checkpoint, then exit
                    if done % every:
                        rng = dist.gather(_rng_state(dev))
                        if dist.main:
                            _save_last(out, job, model, tok, opt, scaler, cfg, progress, rng)
                    log(f"interrupted at step {done}: saved {out / checkpointing.LAST}; continue with --resume")
                    raise TrainingInterrupted(int(stop_signal))
                if on_eval is not None and metrics is not None:
                    on_eval(done, {**metrics, "elapsed_s": elapsed, "train_tokens": progress["tokens"]})
                eta = (cfg.max_steps - done) * session_train_s / (done - first_step)
                if cfg.max_seconds is not None:
                    eta = min(eta, cfg.max_seconds - elapsed)
                bar.update(task, completed=run_fraction(progress, cfg), step=done,
                           info=f"loss {train_loss:.3f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  ETA {max(eta, 0):.0f} s")
                if finishing:
                    break
    except BaseException:  # a crash, a prune or Ctrl-C: the log stays readable, MLflow's run ends
        tracker.close()
        raise

    summary = {"preset": cfg.preset, "steps": progress["step"], "seconds": round(progress["elapsed"], 1),
               "tokens": progress["tokens"], "tokens_per_second": round(session_tokens / max(session_train_s, 1e-9)),
               "stopped": progress["finished"], "processes": dist.world, "device": str(dev), "precision": precision,
               "best": {"step": progress["best_step"], "loss": progress["best_loss"]},
               "val": progress["last_eval"], "train_config": cfg.to_dict()}
    if dist.main:
        checkpointing.update_meta(out, {"training": summary})
        tracker.log("end", progress["step"], **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        tracker.plot()
        tracker.close()
        log(f"stopped after {summary['steps']} steps ({summary['stopped']}), {summary['seconds']} s, "
            f"{summary['tokens_per_second']:,} tokens/s; best val loss {progress['best_loss']:.4f} "
            f"at step {progress['best_step']}")
    return summary


def _count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def window_at(cfg: TrainConfig, step: int, elapsed: float) -> TrainConfig:
    """The settings step `step` draws its batch with: during the short-window part of the run, windows of
    short_context and proportionally more of them (a pure function of the step and the clock, so a resume
    draws the same batches); otherwise `cfg` itself."""
    if not cfg.short_context:
        return cfg
    frac = elapsed / cfg.max_seconds if cfg.schedule_clock == "time" else step / cfg.max_steps
    if frac >= cfg.short_fraction:
        return cfg
    return dataclasses.replace(cfg, context=cfg.short_context,
                               batch_size=cfg.batch_size * (cfg.context // cfg.short_context))


def _switch_on_qat(model: torch.nn.Module, scheme: qat.QatScheme, cfg: TrainConfig, progress: dict) -> None:
    """Fake quantization from the last cfg.qat_fraction of the run on (again after a resume). The best
    model so far is forgotten when it starts: a float model is not the one to quantize."""
    if qat.is_enabled(model) or run_fraction(progress, cfg) < 1 - cfg.qat_fraction:
        return
    qat.enable(model, scheme)
    if progress.get("qat_step") is None:
        progress.update(qat_step=progress["step"], best_loss=math.inf, best_step=None, bad_evals=0)


def run_fraction(progress: dict, cfg: TrainConfig) -> float:
    """How far the run is through whichever budget (steps or seconds) ends it first."""
    frac = progress["step"] / cfg.max_steps
    return max(frac, progress["elapsed"] / cfg.max_seconds) if cfg.max_seconds else frac


def _divisors(batches: list[tuple[torch.Tensor, torch.Tensor]], dist: distributed.Dist) -> list[float]:
    """What each micro-batch's mean loss is divided by so that the step's gradient is that of the mean
    over every target token of the global batch, however it is split into ranks and accumulation
    steps (after DDP averages over ranks). Chat rows differ in how many tokens carry loss, so a plain
    mean of micro-batch means would weight tokens unequally (and differ between 1 and N processes);
    with equal counts (pretraining) the divisor is exactly grad_accum, as before."""
    counts = [int((y != -100).sum()) for _, y in batches]
    total = dist.total(sum(counts))
    return [total / (c * dist.world) if c else math.inf for c in counts]


def _optimizer_step(net, opt, scaler, autocast, batches, params, grad_clip: float, dist, dev,
                    loss_fn, divisors: list[float]) -> tuple[float, float]:
    """Accumulate gradients over `batches` (syncing across ranks on the last), clip, step.
    Returns this rank's mean micro-batch loss and the gradient norm before clipping."""
    loss_sum = torch.zeros((), device=dev)
    for m, (x, y) in enumerate(batches):
        with dist.no_sync(net, sync=m == len(batches) - 1):
            with autocast():
                loss = loss_fn(net, x.to(dev), y.to(dev))
            scaled = loss / divisors[m]  # see _divisors
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.detach()
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum.item() / len(batches), float(grad_norm)


def _done_reason(progress: dict, cfg: TrainConfig) -> str | None:
    """Why a saved run needs no more steps under (possibly extended) settings, or None."""
    if progress["step"] >= cfg.max_steps:
        return "max_steps"
    if cfg.max_seconds is not None and progress["elapsed"] >= cfg.max_seconds:
        return "max_seconds"
    if progress["finished"] == "early_stopping" and 0 < cfg.patience <= progress["bad_evals"]:
        return "early_stopping"
    return None


def _after_eval(out: Path, job: Job, model, tok, cfg: TrainConfig, progress: dict, metrics: dict, tracker: Tracker, log,
                train_loss: float) -> bool:
    """Record an evaluation, publish the model if it is the best so far; True when patience ran out."""
    step = progress["step"]
    window = metrics.get("window")
    metrics = {k: metrics[k] for k in ("loss", "perplexity", "bits_per_char", "tokens")}
    progress["last_eval"] = {"step": step, **metrics}
    # During a short-window phase the full-context loss scores positions not trained yet (it rises while
    # the model learns): the loss at the training window is logged beside it, to see learning and overfitting.
    tracker.log("eval", step, **metrics, **({"window_context": window["context"], "window_loss": window["loss"]}
                                           if window else {}))
    improved = metrics["loss"] < progress["best_loss"] - cfg.min_delta
    if improved:
        progress.update(best_loss=metrics["loss"], best_step=step, bad_evals=0)
        ship, extra, meta = job.publishable(model)
        if qat.is_enabled(model):  # quantize --method qat reads the scheme from here
            meta = {**meta, "qat": qat.parse(cfg.qat).to_dict()}
        checkpointing.publish(out, ship, tok, meta={"preset": cfg.preset, **meta, "training": {
            "best_step": step, "val": metrics, "train_config": cfg.to_dict()}}, extra_files=extra)
    else:
        progress["bad_evals"] += 1
    at_window = f" (at {window['context']} positions: {window['loss']:.4f})" if window else ""
    log(f"step {step}: train loss {train_loss:.4f}, val loss {metrics['loss']:.4f}{at_window}, "
        f"val bpc {metrics['bits_per_char']:.3f}" + ("  (best)" if improved else f"  ({progress['bad_evals']} "
                                                      f"without improvement)"))
    return cfg.patience > 0 and progress["bad_evals"] >= cfg.patience


def _save_last(out: Path, job: Job, model, tok, opt, scaler, cfg: TrainConfig, progress: dict,
               rng_per_rank: list[dict]) -> None:
    rng = {f"{kind}.{rank}": t for rank, st in enumerate(rng_per_rank) for kind, t in st.items()}
    state = {"progress": progress, "config": cfg.to_dict(), "scaler": scaler.state_dict() if scaler else None}
    weights, extra = job.resumable(model)
    checkpointing.save_last(out, weights, tok, opt, state, rng, meta={"preset": cfg.preset, "step": progress["step"]},
                            extra_files=extra)
