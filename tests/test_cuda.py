"""The trainer on an NVIDIA GPU: bf16 autocast, fp16 with loss scaling, the CUDA RNG in the resumable
state, and fp32 weights that load on a CPU. Skipped without CUDA; `benchmarks/gpu_check.sh` runs them in
a GPU session."""
from __future__ import annotations

import json
from pathlib import Path

import crash
import pytest
import torch
from safetensors.torch import load_file

from nima_edge import checkpoint
from nima_edge.train.recipe import TrainConfig
from nima_edge.train.trainer import _rng_state, _set_rng_state, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")
DEVICE = "cuda"
QUIET = dict(log=lambda *_: None)


def tiny(**kw) -> TrainConfig:
    base = dict(preset="nima-0.5m", context=32, batch_size=8, max_steps=40, warmup_steps=2, lr=3e-3,
                eval_every=20, eval_windows=4, log_every=1, device=DEVICE)
    return TrainConfig(**{**base, **kw})


def events(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == kind]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_a_gpu_run_trains_in_half_precision_and_ships_fp32_weights_that_load_on_a_cpu(char_data, tmp_path,
                                                                                     precision):
    out = tmp_path / precision
    summary = train(char_data, out, tiny(precision=precision), **QUIET)
    expected = "fp16" if precision == "fp16" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert summary["device"].startswith("cuda") and summary["precision"] == expected
    assert events(out, "start")[0]["precision"] == expected
    losses = [r["loss"] for r in events(out, "train")]
    assert all(torch.isfinite(torch.tensor(losses))), losses  # fp16: the GradScaler skips overflowing steps
    assert mean(losses[-5:]) < mean(losses[:5]) - 0.3, losses

    shipped = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in shipped.values()} == {torch.float32}  # autocast keeps the master weights fp32
    model, _ = checkpoint.load(out, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        on_cpu = model(ids)
        on_gpu = model.to(DEVICE)(ids.to(DEVICE)).cpu()
    # the same fp32 weights on both devices (cuBLAS may use other summation orders, never TF32 by default)
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3), (on_cpu - on_gpu).abs().max()


def test_the_cuda_rng_round_trips_through_the_resumable_state():
    device = torch.device(DEVICE)
    torch.cuda.manual_seed(7)
    saved = _rng_state(device)
    assert "cuda" in saved  # saved beside the CPU generator's state: dropout masks are drawn on the GPU
    first = torch.rand(1000, device=device)
    torch.cuda.manual_seed(8)
    assert _set_rng_state({f"{k}.0": v for k, v in saved.items()}, 0, device)
    assert torch.equal(torch.rand(1000, device=device), first)


def test_a_resumed_gpu_run_continues_the_same_run(char_data, tmp_path):
    """Crash at step 30, resume to 40: the same steps as the uninterrupted run, and the same losses up
    to the GPU's run-to-run differences (atomics in some backward kernels), far below what other
    dropout masks or a lost optimizer state would change."""
    cfg = tiny(dropout=0.1, checkpoint_every=10, eval_every=10)
    train(char_data, tmp_path / "straight", cfg, **QUIET)

    with pytest.raises(crash.Crash):
        train(char_data, tmp_path / "resumed", cfg, on_eval=crash.at(30), **QUIET)
    summary = train(char_data, tmp_path / "resumed", None, resume=True, **QUIET)
    assert summary["steps"] == 40 and summary["device"].startswith("cuda")
    straight = {r["step"]: r["loss"] for r in events(tmp_path / "straight", "train")}
    resumed = {r["step"]: r["loss"] for r in events(tmp_path / "resumed", "train")}
    late = [s for s in straight if s > 30]
    assert late and all(abs(straight[s] - resumed[s]) < 0.02 for s in late), (straight, resumed)
