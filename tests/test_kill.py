"""Kill tests: a real SIGKILL (of the command's whole process group) at random moments while it
rewrites an output. After every kill the previous good output is intact and loadable, and the next
run succeeds. The default suite kills each command once or twice; `-m slow` runs more kills.

The moments are drawn from [0.3, 1.1] x the duration of an uninterrupted run (so most land in the
writing, not in Python's imports); the seed is in every failure message (NIMA_KILL_SEED repeats it).
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from nima_edge import checkpoint
from nima_edge.manifest import check_files
from nima_edge.train import checkpointing

CLI = [sys.executable, "-m", "nima_edge"]
SEED = int(os.environ.get("NIMA_KILL_SEED", time.time_ns() % 100_000))


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def timed(*args) -> float:
    t0 = time.monotonic()
    out = run(*args)
    assert out.returncode == 0, out.stderr
    return time.monotonic() - t0


def killed_at(args, delay: float) -> bool:
    """Start the command, SIGKILL its process group after `delay` s; False if it finished first."""
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: helper processes die with it
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def kills(n: int, duration: float, label: str):
    rng = random.Random(f"{SEED}-{label}")
    for i in range(n):
        delay = rng.uniform(0.3, 1.1) * duration
        yield delay, f"{label}: kill {i + 1}/{n} at {delay:.2f} s of a {duration:.1f} s run (NIMA_KILL_SEED={SEED})"


def counts(default: int, slow: int):
    return pytest.mark.parametrize("n", [default, pytest.param(slow, marks=pytest.mark.slow)])


def snapshot(path):
    """Every file under `path` (or `path` and its manifest) with its bytes."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        [path, path.with_name(path.name + ".manifest.json")]
    return {str(p.relative_to(path.parent)): p.read_bytes() for p in files}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- data prepare --------------------------------------------------------------------------------

@counts(2, 8)
def test_data_prepare_survives_sigkill(tmp_path, shakespeare_path, n):
    from nima_edge.data import TokenData
    out = tmp_path / "data"
    args = ("data", "prepare", "--corpus", shakespeare_path, "--out", out, "--tokenizer", "bpe", "--vocab-size", 400)
    duration = timed(*args)
    good = snapshot(out)
    for delay, where in kills(n, duration, "data prepare"):
        killed_at(args, delay)
        assert snapshot(out) == good, where  # deterministic: old or new, the same complete bytes
        data = TokenData(out)
        assert len(data.tokens("train")) == data.meta["train"]["tokens"], where
    assert run(*args).returncode == 0
    assert snapshot(out) == good and leftovers(tmp_path) == []


# --- train ---------------------------------------------------------------------------------------

TRAIN = ("--preset", "nima-0.5m", "--steps", 120, "--batch-size", 8, "--context", 64, "--eval-every", 20,
         "--threads", 1, "--lr", 3e-3)


def check_run_loads(out, where):
    last = checkpointing.last_dir(out)
    if last is not None:
        checkpoint.load(last)
        checkpointing.read_state(last)
    if (out / "nima.json").is_file():
        checkpoint.load(out)
    return last


@counts(1, 6)
def test_train_survives_sigkill_and_resumes(tmp_path, char_data, n):
    out = tmp_path / "run"
    first = ("train", "--data", char_data, "--out", out, *TRAIN)
    duration = timed(*first)
    finished = checkpoint.read_meta(out)["training"]
    assert finished["steps"] == 120
    for delay, where in kills(n, duration, "train"):
        # each round starts the run over (--overwrite) and is killed; the killed run must be resumable
        killed_at((*first, "--overwrite"), delay)
        last = check_run_loads(out, where)
        if last is None:
            continue  # killed before its first checkpoint: nothing to resume, nothing half-written either
        state = checkpointing.read_state(last)
        resumed = run("train", "--data", char_data, "--out", out, "--resume", "--threads", 1)  # not a saved setting
        assert resumed.returncode == 0, f"{where}: {resumed.stderr}"
        assert checkpoint.read_meta(out)["training"]["steps"] == 120, where
        assert state["progress"]["step"] <= 120


# A child that trains like `nima-edge train`, but SIGKILLs itself in the middle of deleting the old copy
# of OUT/last (atomic_dir's cleanup after the swap): half of that copy's files are gone when it dies.
DIE_IN_CLEANUP = """
import os, signal, sys
from pathlib import Path
from nima_edge import atomic

class DyingShutil:
    def rmtree(self, path, ignore_errors=False):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        os.kill(os.getpid(), signal.SIGKILL)

atomic.shutil = DyingShutil()  # atomic's own deletions only
sys.argv = ["nima-edge", *sys.argv[1:]]
from nima_edge.cli import main
main()
"""


def test_train_resumes_after_a_kill_during_the_cleanup_of_the_old_checkpoint(tmp_path, char_data):
    out = tmp_path / "run"
    args = ("train", "--data", char_data, "--out", out, *TRAIN[:2], "--steps", 60, *TRAIN[4:])  # saves every 20
    died = subprocess.run([sys.executable, "-c", DIE_IN_CLEANUP, *map(str, args)], capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    trash = [p for p in out.iterdir() if p.name.startswith(".last.nima-")]
    assert trash, "the kill did not land in the cleanup of the old copy"
    state = checkpointing.read_state(check_run_loads(out, "kill in cleanup"))
    assert state["progress"]["step"] > 0  # the new copy is complete and is the one read
    resumed = run("train", "--data", char_data, "--out", out, "--resume", "--threads", 1)  # not a saved setting
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.read_meta(out)["training"]["steps"] == 60
    assert leftovers(out) == [], "the half-deleted old copy was not cleaned up"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_saves_a_resumable_checkpoint(tmp_path, char_data, sig):
    out = tmp_path / "run"
    args = ("train", "--data", char_data, "--out", out, *TRAIN[:2], "--steps", 100_000, *TRAIN[4:])
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or '"train"' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)  # training has started (a step was logged)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted at step" in stdout + stderr and "Traceback" not in stderr, stdout + stderr
    state = checkpointing.read_state(checkpointing.last_dir(out))
    step = state["progress"]["step"]
    assert step > 0 and state["progress"]["finished"] is None
    resumed = run("train", "--data", char_data, "--out", out, "--resume", "--steps", step + 10, "--threads", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {step}" in resumed.stdout.replace("\n", "")
    assert checkpoint.read_meta(out)["training"]["steps"] == step + 10


# --- quantize and export -------------------------------------------------------------------------

@counts(1, 6)
def test_quantize_survives_sigkill(tmp_path, tiny_ckpt, n):
    out = tmp_path / "q4"
    args = ("quantize", tiny_ckpt, "--method", "rtn", "--out", out)
    duration = timed(*args)
    good = snapshot(out)
    for delay, where in kills(n, duration, "quantize"):
        killed_at(args, delay)
        assert snapshot(out) == good, where
        checkpoint.load_model(out)
    assert run(*args).returncode == 0 and snapshot(out) == good and leftovers(tmp_path) == []


def _export_kill_test(tmp_path, ckpt, target, quant, name, n):
    pytest.importorskip({"gguf": "llama_cpp", "onnx": "onnxruntime_genai", "onnx-portable": "onnxruntime",
                         "executorch": "executorch"}[target])
    from nima_edge.runtimes import load_runtime
    out = tmp_path / name
    args = ("export", ckpt, "--target", target, "--quant", quant, "--out", out)
    duration = timed(*args)
    good = snapshot(out)
    for delay, where in kills(n, duration, f"export {target}"):
        killed_at(args, delay)
        assert snapshot(out) == good, where  # exports are deterministic: old == new, never a mix
        assert check_files(out)["target"] == target, where
    load_runtime(out, target).close()
    assert run(*args).returncode == 0 and snapshot(out) == good
    assert leftovers(tmp_path) == [], leftovers(tmp_path)


@counts(2, 6)
def test_export_gguf_survives_sigkill(tmp_path, tiny_ckpt, n):
    _export_kill_test(tmp_path, tiny_ckpt, "gguf", "f32", "m.gguf", n)


@counts(1, 6)
def test_export_onnx_portable_survives_sigkill(tmp_path, tiny_ckpt, n):
    _export_kill_test(tmp_path, tiny_ckpt, "onnx-portable", "f32", "m.onnx", n)


@counts(1, 4)
def test_export_onnx_genai_survives_sigkill(tmp_path, tiny_ckpt, n):
    _export_kill_test(tmp_path, tiny_ckpt, "onnx", "f32", "genai", n)


@pytest.mark.slow  # one ExecuTorch lowering plus the re-run costs minutes: the default suite's 15-minute budget
@pytest.mark.parametrize("n", [1, 4])
def test_export_executorch_survives_sigkill(tmp_path, tiny_ckpt, n):
    _export_kill_test(tmp_path, tiny_ckpt, "executorch", "fp32", "et", n)


def test_export_tensorrt_survives_sigkill(tmp_path, tiny_ckpt):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("the tensorrt target needs an NVIDIA GPU (CUDA not available)")
    _export_kill_test(tmp_path, tiny_ckpt, "tensorrt", "f32", "trt", 2)
