"""nima-edge tune: an Optuna search on a wall-clock budget that writes a loadable recipe."""
from __future__ import annotations

import pytest

from nima_edge.errors import NimaError
from nima_edge.train import recipe
from nima_edge.train.recipe import TrainConfig
from nima_edge.train.tune import EVALS_PER_TRIAL, batch_sizes, pruning_step, tune

optuna = pytest.importorskip("optuna")
BASE = TrainConfig(preset="nima-0.5m", context=32, eval_windows=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: see tests/test_train.py (OpenMP spinning on a loaded machine)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tune_writes_the_best_recipe_and_keeps_the_best_model(char_data, tmp_path):
    out = tmp_path / "best.toml"
    figures = tune(char_data, out, BASE, budget_s=12, trial_s=3, log=lambda *_: None)
    cfg = recipe.load(out)
    measured = recipe.measured(out)
    assert measured["trials"] >= 2 and measured["val_loss"] == figures["val_loss"]
    assert 1e-3 <= cfg.lr <= 3e-2 and cfg.batch_size in batch_sizes(BASE) and 0 <= cfg.dropout <= 0.2
    assert cfg.max_seconds == 3 and cfg.schedule_clock == "time" and cfg.preset == "nima-0.5m"
    # The best trial's trained model is kept beside the recipe, and scored on the whole validation split
    # (the trials compared on BASE.eval_windows windows of it).
    from nima_edge.checkpoint import load
    from nima_edge.data import TokenData
    from nima_edge.evaluate import evaluate
    from nima_edge.train.tune import tune_record
    model_dir = tmp_path / "best"
    assert figures["model"] == str(model_dir) and tune_record(model_dir)["trial"] == figures["best_trial"]
    assert tune_record(model_dir)["val_loss"] == pytest.approx(figures["val_loss"], abs=1e-4)
    model, _ = load(model_dir)
    whole = evaluate(model, TokenData(char_data), context=BASE.context)
    assert whole["tokens"] > evaluate(model, TokenData(char_data), context=BASE.context, max_windows=2)["tokens"]
    assert figures["val_bits_per_char"] == round(whole["bits_per_char"], 4) and figures["val_windows"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.toml"]  # no lock or staging left


def test_pruned_trials_do_not_count(char_data, tmp_path):
    # A pruner that stops every trial at its first report: nothing completes, and tune says so.
    with pytest.raises(NimaError, match="no tuning trial completed"):
        tune(char_data, tmp_path / "x.toml", BASE, budget_s=6, trial_s=3, log=lambda *_: None,
             pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    assert not (tmp_path / "x.toml").exists()


def test_budget_smaller_than_a_trial_is_an_error(char_data, tmp_path):
    with pytest.raises(NimaError, match="does not fit one trial"):
        tune(char_data, tmp_path / "x.toml", BASE, budget_s=10, trial_s=60)


def test_search_space_is_tokens_per_step_and_the_short_window_part():
    """Batch choices are tokens per step at the recipe's context (512-4,096: the 5-minute winner, 1,024 at
    context 256, is among them), and a recipe with short-then-long windows also searches their share."""
    assert batch_sizes(TrainConfig(context=256)) == [2, 4, 8, 16]
    assert batch_sizes(TrainConfig(context=64)) == [8, 16, 32, 64]
    assert batch_sizes(TrainConfig(context=1024)) == [1, 2, 4]
    assert batch_sizes(TrainConfig(context=256, grad_accum=4)) == [4, 8, 16]
    from nima_edge.train.tune import suggest
    base = TrainConfig(preset="nima-1m", context=256, short_context=64, short_fraction=0.75)
    trial = optuna.trial.FixedTrial({"lr": 4e-3, "step_tokens": 1024, "dropout": 0.0, "warmup_steps": 50,
                                     "beta2": 0.99, "short_fraction": 0.9})
    cfg = suggest(trial, base, 300, {"nima-1m": 4096})
    assert (cfg.batch_size, cfg.short_fraction, cfg.beta2, cfg.min_lr, cfg.eval_every) == (4, 0.9, 0.99, 4e-4, 4)


def test_the_shape_is_searched_among_presets_each_at_its_declared_context(char_data, tmp_path):
    """--presets: a trial may pick another preset; it then trains every position that preset declares
    (nima-5m: 512) with the same tokens per step, and the written recipe carries the winner's shape."""
    from nima_edge.train.tune import suggest
    base = TrainConfig(preset="nima-1m", context=256, short_context=64, short_fraction=0.9)
    params = {"lr": 4e-3, "step_tokens": 2048, "dropout": 0.0, "warmup_steps": 0, "beta2": 0.99, "short_fraction": 0.9}
    five = suggest(optuna.trial.FixedTrial({**params, "preset": "nima-5m"}), base, 60, {"nima-1m": 1, "nima-5m": 1},
                   ("nima-1m", "nima-5m"))
    assert (five.preset, five.context, five.batch_size, five.short_context) == ("nima-5m", 512, 4, 64)
    one = suggest(optuna.trial.FixedTrial({**params, "preset": "nima-1m"}), base, 60, {"nima-1m": 1, "nima-5m": 1},
                  ("nima-1m", "nima-5m"))
    assert (one.preset, one.context, one.batch_size) == ("nima-1m", 256, 8)
    with pytest.raises(NimaError, match="not a known preset"):
        tune(char_data, tmp_path / "x.toml", BASE, budget_s=6, trial_s=3, presets=("nima-0.5m", "nima-7m"))
    out = tmp_path / "shape.toml"
    figures = tune(char_data, out, BASE, budget_s=8, trial_s=2, log=lambda *_: None, presets=("nima-0.5m", "nima-1m"))
    cfg = recipe.load(out)
    assert figures["presets_searched"] == ["nima-0.5m", "nima-1m"] and cfg.preset in figures["presets_searched"]
    assert cfg.context == 256  # both declare 256 positions; the base recipe's 32 is not what they are used at


def test_the_pruner_compares_trials_at_equal_time_and_only_at_the_full_context():
    """Steps are shares of the trial's time; a trial still on short windows (validation at 256 positions
    of a model trained on 64), or less than a bucket past them, reports nothing, or the ones with the most
    short windows would be pruned."""
    plain = TrainConfig(preset="nima-1m", context=256)
    assert [pruning_step(plain, t, 60) for t in (5, 10, 30, 59, 61)] == [0, 1, 3, 5, EVALS_PER_TRIAL]
    short = TrainConfig(preset="nima-1m", context=256, short_context=64, short_fraction=0.75)
    assert [pruning_step(short, t, 60) for t in (10, 45, 54.9, 55, 59, 60)] == [None, None, None, 5, 5,
                                                                               EVALS_PER_TRIAL]
    late = TrainConfig(preset="nima-1m", context=256, short_context=64, short_fraction=0.9)
    assert [pruning_step(late, t, 3600) for t in (3300, 3599)] == [None, None]  # only its finished value counts


def test_the_search_starts_from_the_base_recipe(char_data, tmp_path):
    """Trial 0 is the base recipe snapped onto the space: the bundled nima-1m recipe is a point of it as
    it stands, out-of-range values land on the nearest edge or step, and a search runs that point first."""
    from nima_edge.train.tune import start_params, suggest
    bundled = recipe.load("nima-1m")
    params = start_params(bundled)
    assert params == {"lr": 0.004, "step_tokens": 1024, "dropout": 0.0, "warmup_steps": 50, "beta2": 0.99,
                      "short_fraction": 0.9}
    again = suggest(optuna.trial.FixedTrial(params), bundled, 300, {"nima-1m": 4096})
    for key in ("lr", "min_lr", "batch_size", "dropout", "warmup_steps", "beta2", "short_fraction", "context"):
        assert getattr(again, key) == getattr(bundled, key), key
    odd = TrainConfig(preset="nima-1m", context=256, lr=0.1, batch_size=14, dropout=0.5, warmup_steps=37,
                      beta2=0.9, short_context=64, short_fraction=0.33)
    assert start_params(odd, ("nima-5m", "nima-10m")) == {
        "lr": 3e-2, "step_tokens": 4096, "dropout": 0.2, "warmup_steps": 25, "beta2": 0.95, "short_fraction": 0.5,
        "preset": "nima-5m"}
    logged = []
    figures = tune(char_data, tmp_path / "t.toml", BASE, budget_s=8, trial_s=2, log=logged.append)
    assert logged[0].startswith("trial 0: ") and str(start_params(BASE)) in logged[0]
    assert "base_recipe_val_loss" in figures and figures["val_loss"] <= figures["base_recipe_val_loss"]


def test_jobs_run_trials_in_processes_of_their_own(char_data, tmp_path):
    """--jobs 2: two processes draw trials from one study (each its own pid), and the best of all is written."""
    # 17 s of the 20 to start trials: room for the second process to import torch on a busy machine
    figures = tune(char_data, tmp_path / "j.toml", BASE, budget_s=20, trial_s=3, log=lambda *_: None, jobs=2,
                   threads=1)
    assert figures["jobs"] == 2 and figures["processes"] == 2 and figures["trials"] >= 3
    from nima_edge.train.tune import tune_record
    assert tune_record(tmp_path / "j")["trial"] == figures["best_trial"]  # workers kept the best, not the last
    assert recipe.measured(tmp_path / "j.toml")["val_loss"] == figures["val_loss"]
    with pytest.raises(NimaError, match="at least one process"):
        tune(char_data, tmp_path / "x.toml", BASE, budget_s=6, trial_s=3, jobs=0)


def test_each_finished_trial_replaces_the_kept_model_only_if_it_is_better(tmp_path):
    """What an interrupted search leaves: the best finished trial so far; a new search replaces the last one's."""
    from nima_edge.train.tune import _keep_if_best, tune_record
    kept = tmp_path / "tuned"

    def finish(search, trial, loss):
        run = tmp_path / f"run-{search}-{trial}"
        run.mkdir()
        (run / "weights").write_text(f"trial {trial}")
        _keep_if_best(run, kept, search, trial, loss)
        return (kept / "weights").read_text(), tune_record(kept)["trial"]

    assert finish("a", 0, 2.0) == ("trial 0", 0)
    assert finish("a", 1, 2.5) == ("trial 0", 0)  # worse: the better model stays
    assert finish("a", 2, 1.5) == ("trial 2", 2)
    assert finish("b", 0, 3.0) == ("trial 0", 0)  # a new search starts over
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("run-")) == [".tuned.lock", "tuned"]
