"""The floor and the projections (benchmarks/roofline.py): costs read from real artifacts, machine figures,
and `bench --profile raspberry-pi-5` on a non-arm machine printing projections, never measurements."""
import json
import math
import os
import platform
import subprocess
import sys

import pytest
from safetensors import safe_open

from nima_edge.benchmarks.harness import load_profile
from nima_edge.benchmarks.roofline import (ArtifactCost, Machine, Shape, analyse, attach_predictions, floor_ms,
                                           measure_machine, profile_machine)

MACHINE = Machine(cache_read_gbs=100.0, dram_read_gbs=10.0, cache_bytes=1_000_000, gemm_gflops=50.0, threads=2,
                  source="test")


def checkpoint_params(ckpt) -> int:
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def test_costs_of_the_checkpoint_match_its_tensors(tiny_ckpt):
    cost = analyse(tiny_ckpt, "torch")
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cost.shape.layers == cfg["num_hidden_layers"] and cost.shape.vocab == cfg["vocab_size"]
    # matmul parameters (tied LM head counted once) are all parameters less the norms' vectors
    norms = cfg["hidden_size"] * (2 * cfg["num_hidden_layers"] + 1)
    assert cost.shape.matmul_params == checkpoint_params(tiny_ckpt) - norms
    assert cost.weight_bytes >= 4 * cost.shape.matmul_params  # fp32 safetensors, plus the header
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cost.kv_bytes_per_pos == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4


def test_gguf_costs_follow_the_quantization(tmp_path, tiny_ckpt):
    pytest.importorskip("llama_cpp")
    from nima_edge.export import export
    f32 = analyse(export(tiny_ckpt, "gguf", tmp_path / "f32.gguf", "f32"))
    q8 = analyse(export(tiny_ckpt, "gguf", tmp_path / "q8.gguf", "q8_0"))
    assert f32.shape == q8.shape == analyse(tiny_ckpt, "torch").shape
    # Q8_0 is 34 bytes per 32 weights against 128 (norms stay F32)
    assert 0.25 < q8.weight_bytes / f32.weight_bytes < 0.3
    assert f32.kv_bytes_per_pos == 2 * q8.kv_bytes_per_pos  # F32 cache for the exact file, F16 otherwise


def test_floor_is_memory_or_compute_bound_by_hand():
    shape = Shape(layers=1, hidden=4, heads=1, kv_heads=1, head_dim=4, ffn=4, vocab=4)
    small = ArtifactCost("gguf", weight_bytes=500_000, kv_bytes_per_pos=0, shape=shape)  # fits the cache
    big = ArtifactCost("gguf", weight_bytes=2_000_000, kv_bytes_per_pos=0, shape=shape)
    # 1 prompt token + 1 decode = 2 passes, each reading the weights once
    assert floor_ms(small, MACHINE, 1, 2)["floor_ms"] == pytest.approx(2 * 500_000 / 100e9 * 1e3)
    assert floor_ms(big, MACHINE, 1, 2)["floor_ms"] == pytest.approx(2 * 2_000_000 / 10e9 * 1e3)
    heavy = Shape(layers=1, hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=4096, vocab=4)
    compute = floor_ms(ArtifactCost("gguf", 1000, 0, heavy), MACHINE, 16, 2)
    assert compute["bound"] == "compute" and compute["floor_ms"] > compute["memory_ms"]


def test_predictions_are_out_of_sample():
    s1 = {"layers": 1, "hidden": 4, "heads": 1, "kv_heads": 1, "head_dim": 4, "ffn": 4, "vocab": 4}
    s2 = {**s1, "layers": 2}
    rows = [{"target": "gguf", "quant": "q4_0", "cost": {"shape": s1}, "floor_ms": 1.0, "gen_ms_median": 11.0},
            {"target": "gguf", "quant": "q4_0", "cost": {"shape": s2}, "floor_ms": 5.0, "gen_ms_median": 20.0},
            {"target": "onnx", "quant": "int4", "cost": {"shape": s1}, "floor_ms": 1.0, "gen_ms_median": 3.0}]
    attach_predictions(rows, 16, 10)
    # the first is predicted from the second's 15 ms over its floor and back; the onnx row has no partner
    assert rows[0]["predicted_ms"] == pytest.approx(1.0 + 15.0) and rows[1]["predicted_ms"] == pytest.approx(15.0)
    assert rows[0]["prediction_error"] == pytest.approx(16 / 11 - 1) and "predicted_ms" not in rows[2]


def test_overhead_that_grows_with_the_model_is_carried_between_sizes():
    """Three sizes whose overhead per pass is 0.2 ms + 1 ns per matmul weight (as a runtime's kernels below
    the roofline make it): each is predicted exactly from the other two, where a constant overhead would
    miss the smallest by far."""
    s = {"layers": 1, "hidden": 64, "heads": 1, "kv_heads": 1, "head_dim": 64, "ffn": 64, "vocab": 64}
    rows = []
    for layers in (1, 4, 16):
        shape = {**s, "layers": layers}
        weights = Shape(**shape).matmul_params
        rows.append({"target": "gguf", "quant": "q8_0", "cost": {"shape": shape}, "floor_ms": 0.5,
                     "gen_ms_median": 0.5 + 10 * (0.2 + 1e-6 * weights)})
    attach_predictions(rows, 16, 10)
    for r in rows:
        assert r["prediction_error"] == pytest.approx(0.0, abs=1e-9)


def test_this_machine_is_measured():
    m = measure_machine(1)
    assert m.dram_read_gbs > 0.1 and m.cache_read_gbs > 0.1 and m.gemm_gflops > 0.1 and m.threads == 1


def test_device_profiles_cite_their_figures():
    for name in ("raspberry-pi-5", "android-phone"):
        prof = load_profile(name)
        dev = profile_machine(prof.device, prof.threads)
        assert dev.dram_read_gbs < dev.cache_read_gbs and "published figures" in dev.source
        assert prof.device["citation"]
    assert load_profile("desktop-cpu").device is None and not load_profile("desktop-cpu").projects_here()


@pytest.mark.skipif(platform.machine().lower() in ("aarch64", "arm64"), reason="an arm64 host measures, not projects")
def test_bench_with_a_device_profile_projects_and_says_so(tmp_path, tiny_ckpt):
    from nima_edge.export import export
    gguf = export(tiny_ckpt, "gguf", tmp_path / "tiny.gguf", "f32")  # a target the Pi profile runs
    out = subprocess.run([sys.executable, "-m", "nima_edge", "bench", str(gguf), "--profile", "raspberry-pi-5",
                          "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr
    assert "PROJECTION, NOT A MEASUREMENT" in out.stdout and "projected" in out.stdout
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    (row,) = report["results"]
    assert report["projection"]["source"].startswith("published figures")
    assert row["projected_ms"] >= row["device_floor_ms"] > 0 and "projected_within_budget" in row
    assert row["threads"] <= (os.cpu_count() or 1)  # not the Pi's 4 on a smaller host
