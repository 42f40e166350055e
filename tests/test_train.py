"""The trainer: schedules, clipping, accumulation, resume, DDP, early stopping, recipes, tracking."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import crash
import pytest
import torch
from safetensors.torch import load_file

from nima_edge import checkpoint
from nima_edge.errors import NimaError
from nima_edge.train import recipe
from nima_edge.train.checkpointing import last_dir, read_state
from nima_edge.train.optim import Lion
from nima_edge.train.recipe import TrainConfig
from nima_edge.train.schedules import lr_at
from nima_edge.train.trainer import train

QUIET = dict(log=lambda *_: None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, loaded machine OpenMP's
    spinning threads make them ~50x slower; one thread keeps these tests fast anywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> TrainConfig:
    """A nima-0.5m run small enough for a few steps in about a second."""
    base = dict(preset="nima-0.5m", context=32, batch_size=8, max_steps=4, warmup_steps=1, lr=3e-3,
                eval_every=1000, eval_windows=2, log_every=1)
    return TrainConfig(**{**base, **kw})


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"


# --- schedules -----------------------------------------------------------------------------------

def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)  # linear warmup
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[60] == pytest.approx((1e-2 + 1e-3) / 2)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-3)


def test_cosine_restarts_cycles_grow():
    cfg = TrainConfig(schedule="cosine_restarts", lr=1.0, min_lr=0.0, warmup_steps=0, restart_steps=10,
                      restart_mult=2.0)
    assert lr_at(0, cfg) == 1.0 and lr_at(10, cfg) == 1.0 and lr_at(30, cfg) == 1.0  # restarts at 10, 10+20
    assert lr_at(5, cfg) == pytest.approx(0.5) and lr_at(20, cfg) == pytest.approx(0.5)  # mid-cycle
    assert lr_at(29, cfg) < 0.01


def test_constant_and_time_clock():
    assert lr_at(500, TrainConfig(schedule="constant", lr=2e-3, warmup_steps=5)) == 2e-3
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10 ** 6, max_seconds=60, schedule_clock="time")
    assert lr_at(10, cfg, time_fraction=0.5) == pytest.approx(0.5)  # the clock is further along than the steps
    assert lr_at(10, cfg, time_fraction=1.0) == pytest.approx(0.0)


# --- optimizer -----------------------------------------------------------------------------------

def test_lion_update_is_the_papers():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -0.1, 0.0])
    opt.step()
    # m = 0 at first: update = sign(0.1 * g); p = p * (1 - lr * wd) - lr * update
    expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.05) - 0.1 * torch.tensor([1.0, -1.0, 0.0])
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.5, -0.1, 0.0]))


# --- training equivalences -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def baseline_run(char_data, tmp_path_factory) -> Path:
    """3 steps, global batch 8, one process, no accumulation: the reference for the equivalences."""
    out = tmp_path_factory.mktemp("train") / "baseline"
    train(char_data, out, tiny(max_steps=3), **QUIET)
    return out


def test_gradient_accumulation_matches_one_big_batch(baseline_run, char_data, tmp_path):
    train(char_data, tmp_path / "accum", tiny(max_steps=3, grad_accum=4), **QUIET)
    assert_close(weights(tmp_path / "accum" / "last"), weights(baseline_run / "last"), atol=2e-5)


def test_gradient_clipping_bounds_the_step(char_data, tmp_path):
    """Clipped to a norm far below Adam's eps the first update all but vanishes; unclipped it is ~lr."""
    torch.manual_seed(1337)
    from nima_edge.config import preset
    from nima_edge.data import TokenData
    from nima_edge.model import NimaForCausalLM
    init = {k: v for k, v in NimaForCausalLM(preset("nima-0.5m", TokenData(char_data).tokenizer.vocab_size))
            .state_dict().items() if k != "lm_head.weight"}
    moved = {}
    for clip in (0.0, 1e-12):
        out = tmp_path / f"clip{clip}"
        train(char_data, out, tiny(max_steps=1, grad_clip=clip, weight_decay=0.0), **QUIET)
        moved[clip] = max((weights(out)[k] - init[k]).abs().max().item() for k in init)
    assert moved[0.0] > 1e-3  # Adam's first step moves weights by about lr
    assert moved[1e-12] < 1e-5


@pytest.mark.parametrize("windows", [{}, {"short_context": 8, "short_fraction": 0.75},
                                     {"qat": "int4-g32", "qat_fraction": 0.5}], ids=["full", "short-then-long", "qat"])
def test_resume_equals_uninterrupted(char_data, tmp_path, windows):
    """train 12 == train, crash at 9 (last checkpoint at 8), resume to 12; with dropout, so RNG state matters.
    With short windows for steps 0-8 the resume starts in the short part and crosses into the long one;
    with QAT from step 6 it resumes inside the fake-quantized part (switched on again)."""
    cfg = tiny(max_steps=12, dropout=0.1, eval_every=3, checkpoint_every=4, **windows)
    train(char_data, tmp_path / "straight", cfg, **QUIET)

    with pytest.raises(crash.Crash):
        train(char_data, tmp_path / "resumed", cfg, on_eval=crash.at(9), **QUIET)
    state = json.loads((tmp_path / "resumed" / "last" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 8  # lost one checkpoint interval at most
    summary = train(char_data, tmp_path / "resumed", None, resume=True, **QUIET)
    assert summary["steps"] == 12
    a, b = weights(tmp_path / "straight" / "last"), weights(tmp_path / "resumed" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    oa = load_file(str(tmp_path / "straight" / "last" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "resumed" / "last" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resume_survives_a_kill_between_the_two_renames(baseline_run, char_data, tmp_path):
    """atomic_dir moves OUT/last aside before moving the new copy in; a kill in between leaves .last.old."""
    run = tmp_path / "run"
    shutil.copytree(baseline_run, run)
    (run / "last").rename(run / ".last.old")
    assert train(char_data, run, None, resume=True, overrides={"max_steps": 4}, **QUIET)["steps"] == 4
    assert read_state(run / "last")["progress"]["step"] == 4


def test_resume_refuses_changed_settings_and_missing_run(char_data, tmp_path, baseline_run):
    with pytest.raises(NimaError, match="no resumable checkpoint"):
        train(char_data, tmp_path / "nothing", None, resume=True, **QUIET)
    with pytest.raises(NimaError, match="cannot change lr"):
        train(char_data, baseline_run, None, resume=True, overrides={"lr": 1e-4}, **QUIET)


def test_resume_continues_on_the_runs_own_data(baseline_run, char_data, bpe_data, tmp_path, cli):
    """--resume needs no --data (the run records it); a moved copy of the same data is accepted, other text is
    refused, and so is an old run without the record unless --data is given."""
    run = tmp_path / "run"
    shutil.copytree(baseline_run, run)
    assert train(None, run, None, resume=True, overrides={"max_steps": 4}, **QUIET)["steps"] == 4
    moved = tmp_path / "moved"
    shutil.copytree(char_data, moved)
    assert train(moved, run, None, resume=True, overrides={"max_steps": 5}, **QUIET)["steps"] == 5
    with pytest.raises(NimaError, match="holds other text than the run"):
        train(bpe_data, run, None, resume=True, overrides={"max_steps": 6}, **QUIET)
    code, out, err = cli("train", "--out", run, "--resume", "--steps", 6)
    assert code == 0, err
    (run / "last" / "data.json").unlink()  # as a run written before the record
    with pytest.raises(NimaError, match="pass --data DIR"):
        train(None, run, None, resume=True, overrides={"max_steps": 7}, **QUIET)
    assert train(char_data, run, None, resume=True, overrides={"max_steps": 7}, **QUIET)["steps"] == 7


def test_early_stopping_keeps_best(char_data, tmp_path):
    # min_delta so large that only the first evaluation counts as an improvement
    cfg = tiny(max_steps=100, eval_every=2, patience=2, min_delta=100.0)
    summary = train(char_data, tmp_path / "es", cfg, **QUIET)
    assert summary["stopped"] == "early_stopping" and summary["steps"] == 6
    assert checkpoint.read_meta(tmp_path / "es")["training"]["best"]["step"] == 2
    model, _ = checkpoint.load(tmp_path / "es")  # the published best is a loadable checkpoint
    assert model.num_parameters() > 0


def test_tracking_outputs(baseline_run):
    from nima_edge.train.tracking import read_metrics
    recs = read_metrics(baseline_run / "metrics.jsonl")
    assert [r["step"] for r in recs if r["event"] == "train"] == [1, 2, 3]
    ev = [r for r in recs if r["event"] == "eval"]
    assert len(ev) == 1 and math.isclose(ev[0]["perplexity"], math.exp(ev[0]["loss"]), rel_tol=1e-9)
    assert 0 < ev[0]["bits_per_char"] < 10
    assert (baseline_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert recipe.load(baseline_run / "recipe.toml") == tiny(max_steps=3)  # the run's settings, re-loadable


def test_bf16_autocast_on_cpu(char_data, tmp_path):
    summary = train(char_data, tmp_path / "bf16", tiny(max_steps=2, precision="bf16"), **QUIET)
    assert math.isfinite(summary["val"]["loss"])


@pytest.mark.slow  # importing mlflow and creating its SQLite store takes ~15 s
def test_mlflow_local_store(char_data, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is an optional tracker")
    from mlflow.tracking import MlflowClient
    train(char_data, tmp_path / "ml", tiny(max_steps=2, mlflow=True), **QUIET)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")
    run = client.get_run((tmp_path / "ml" / "mlflow_run_id").read_text())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.data.params["preset"] == "nima-0.5m"


# --- processes: torchrun and kill -9 -------------------------------------------------------------

CLI_ARGS = ["--preset", "nima-0.5m", "--context", "32", "--batch-size", "8", "--device", "cpu"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_ddp_two_processes_equal_one(baseline_run, char_data, tmp_path):
    """torchrun, 2 gloo processes x 2 accumulation steps x 2 windows == 1 process x 8 windows."""
    out = tmp_path / "ddp"
    rc = tiny(max_steps=3)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe.dumps(rc))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "nima_edge.train", "--data", str(char_data), "--out", str(out),
                           "--recipe", str(recipe_file), "--device", "cpu", "--grad-accum", "2"],
                          capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint.read_meta(out)["training"]["processes"] == 2
    assert_close(weights(out / "last"), weights(baseline_run / "last"), atol=2e-5)


def test_kill_9_leaves_a_resumable_checkpoint(char_data, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "nima_edge.train", "--data", str(char_data), "--out", str(out), *CLI_ARGS,
            "--steps", "100000", "--eval-every", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    state = out / "last" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["progress"]["step"] >= 6:
                break
        except (OSError, ValueError):  # not written yet, or caught between atomic_dir's two renames
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run, possibly mid-write
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    last = last_dir(out)  # OUT/last, or its complete previous copy if the kill fell between two renames
    step = read_state(last)["progress"]["step"]
    checkpoint.load(last)  # complete, not corrupt
    checkpoint.load(out)  # the published best too
    summary = train(char_data, out, None, resume=True, overrides={"max_steps": step + 2}, **QUIET)
    assert summary["steps"] == step + 2


def test_short_windows_then_the_full_context_with_the_same_tokens_per_step():
    from nima_edge.train.trainer import window_at
    cfg = tiny(context=32, short_context=8, short_fraction=0.5, max_steps=4)
    assert [(w.context, w.batch_size) for w in (window_at(cfg, s, 0.0) for s in range(4))] == \
        [(8, 32), (8, 32), (32, 8), (32, 8)]
    timed = tiny(context=32, short_context=8, short_fraction=0.5, schedule_clock="time", max_seconds=10.0)
    assert window_at(timed, 99, 4.9).context == 8 and window_at(timed, 0, 5.0).context == 32
    assert window_at(tiny(), 0, 0.0).context == 32  # off by default


def test_a_context_override_below_the_recipes_short_windows_trains_plain_windows():
    cfg = recipe.build_config("nima-1m", {"context": 64})
    assert (cfg.context, cfg.short_context, cfg.short_fraction) == (64, 0, 0.0)
    assert recipe.build_config("nima-1m", {"context": 128}).short_context == 64  # still divides: kept


def test_the_short_window_phase_is_also_scored_at_its_window(char_data, tmp_path):
    """Full-context validation during short windows scores untrained positions; the loss at the training
    window is logged beside it (metrics.jsonl, the log line), and only while the windows are short."""
    lines = []
    train(char_data, tmp_path / "run", tiny(max_steps=4, eval_every=1, short_context=8, short_fraction=0.5),
          log=lines.append)
    from nima_edge.train.tracking import read_metrics
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "eval"]
    assert [r.get("window_context") for r in evals] == [8, 8, None, None]
    assert all(0 < r["window_loss"] < 10 and r["window_loss"] != r["loss"] for r in evals[:2])
    assert sum("(at 8 positions: " in line for line in lines) == 2


def test_short_windows_reach_the_model(baseline_run, char_data, tmp_path):
    train(char_data, tmp_path / "short", tiny(max_steps=3, short_context=8, short_fraction=0.5), **QUIET)
    a, b = weights(tmp_path / "short" / "last"), weights(baseline_run / "last")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_says_what_precision_it_trained_in(char_data, tmp_path):
    """auto is fp32 on a CPU; bf16 autocast runs on a CPU too (on CUDA: tests/test_cuda.py)."""
    assert train(char_data, tmp_path / "auto", tiny(max_steps=1), **QUIET)["precision"] == "fp32"
    assert train(char_data, tmp_path / "bf16", tiny(max_steps=1, precision="bf16"), **QUIET)["precision"] == "bf16"
    start = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["precision"] == "bf16"


# --- recipes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", recipe.bundled_recipes())
def test_bundled_recipes_load(name):
    cfg = recipe.load(name)
    # a preset's recipe is named after it; a variant (nima-1m-60min) starts with its name
    assert name == cfg.preset or name.startswith(cfg.preset + "-")
    assert recipe.measured(Path(recipe.__file__).with_name("recipes") / f"{name}.toml")


@pytest.mark.parametrize("text, message", [
    ("[model]\npreset = \"nima-1m\"\n[optimiser]\nlr = 1e-3\n", r"unknown section \[optimiser\]"),
    ("[model]\nlr = 1e-3\n", r"lr belongs in \[optimizer\]"),
    ("[optimizer]\nlearning_rate = 1e-3\n", r"keys of \[optimizer\] are"),
    ("[optimizer]\nlr = \"fast\"\n", r"lr = 'fast' should be a float"),
    ("[optimizer]\nlr = -1.0\n", r"lr = -1.0 is outside"),
    ("[batch]\nbatch_size = 0\n", r"batch_size = 0 must be at least 1"),
    ("[model]\npreset = \"nima-2m\"\n", r"not a known preset"),
    ("[model]\ncontext = 4096\n", r"exceeds the nima-1m context"),
    ("[schedule]\nschedule_clock = \"time\"\n", r"needs a wall-clock budget"),
    ("[optimizer\nlr = 1\n", r"not valid TOML"),
    ("[model]\ncontext = 256\nshort_context = 100\nshort_fraction = 0.5\n", r"must divide context \(256\)"),
    ("[model]\nshort_fraction = 0.5\n", r"needs a short_context"),
    ("[model]\ncontext = 256\nshort_context = 64\n", r"short_fraction = 0.0 must be in \(0, 1\)"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(NimaError, match=message) as e:
        recipe.load(path)
    assert e.value.fix


def test_cli_bad_recipe_is_a_clean_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optimizer]\nlr = -1.0\n")
    proc = subprocess.run([sys.executable, "-m", "nima_edge.train", "--recipe", str(path), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr


def test_pretraining_with_qat_ships_a_quantization_aware_model(cli, char_data, tmp_path):
    """`train --qat`: the last part of pretraining is fake-quantized, the best model is chosen among those
    evaluations, and `quantize --method qat` reads off its codes."""
    from nima_edge.quantization import load_quant
    out = tmp_path / "run"
    code, _, err = cli("train", "--data", char_data, "--out", out, "--preset", "nima-0.5m", "--context", 32,
                       "--batch-size", 8, "--steps", 8, "--eval-every", 2, "--qat", "int4-g32", "--qat-fraction", 0.5,
                       "--threads", 1)
    assert code == 0, err
    meta = checkpoint.read_meta(out)
    assert meta["qat"]["name"] == "int4-g32" and meta["training"]["best"]["step"] >= 4
    code, _, err = cli("quantize", out, "--method", "qat", "--out", tmp_path / "q")
    assert code == 0, err
    assert {q.method for q in load_quant(tmp_path / "q").values()} == {"qat"}
    code, _, err = cli("train", "--data", char_data, "--out", tmp_path / "bad", "--qat", "int3-g32")
    assert code != 0 and "unknown QAT scheme" in err


def test_uneven_batch_split_is_an_error(char_data, tmp_path):
    with pytest.raises(NimaError, match="multiple of 3"):
        train(char_data, tmp_path / "x", tiny(batch_size=8, grad_accum=3), **QUIET)


@pytest.mark.parametrize("seconds,per_iter", [(300, 0.1339), (300, 0.1268), (300, 0.102), (600, 0.113), (5, 0.2), (60, 0.05)])
def test_nanogpt_baseline_fills_its_budget(seconds, per_iter):
    """The training benchmark runs the real nanoGPT for max_iters iterations, set from a speed probe: they
    must fill the wall-clock budget (within one evaluation interval) without running past it, and the
    last evaluation (where nanoGPT saves its checkpoint) must fall on max_iters."""
    from nima_edge.benchmarks.experiments.train_shakespeare import nanogpt_iterations
    iters, every = nanogpt_iterations(seconds, per_iter)
    cost = iters * per_iter * (1 + 13 / 250)  # training plus its evaluations
    assert iters % every == 0 and 125 <= every <= 375 or iters == every
    assert cost <= seconds and (cost >= 0.9 * seconds or iters == 20)
