"""Each runtime's own tool beside ours (benchmarks/peers.py, `bench --compare-peers`): real tools on real
tiny artifacts; a peer that cannot run says why; the gate is the profile's peer_ratio_limit."""
import json
import os
import subprocess
import sys

import pytest

from nima_edge.benchmarks.peers import OPTIMUM_PYTHON, time_peer

PROMPT, NEW = 16, 5


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_ckpt):
    pytest.importorskip("onnxruntime_genai", reason="the onnx extra is not installed")
    from nima_edge.export import export
    return export(tiny_ckpt, "onnx", tmp_path_factory.mktemp("onnx") / "tiny-onnx", "f32")


def check_timed(row, peer):
    assert "peer_error" not in row, row.get("peer_error")
    assert row["peer"].startswith(peer) and len(row["peer_ms_runs"]) == 2 and min(row["peer_ms_runs"]) > 0


def test_ort_genai_generator_loop(tiny_onnx):
    check_timed(time_peer(tiny_onnx, "onnx", 1, PROMPT, NEW, runs=2, warmup=1), "onnxruntime-genai")


def test_executorch_stock_runner(tiny_pte):
    check_timed(time_peer(tiny_pte, "executorch", 1, PROMPT, NEW, runs=2, warmup=1), "ExecuTorch TextLLMRunner")


@pytest.mark.slow  # builds llama-bench from the pinned sdist the first time (minutes), cached after
def test_llama_bench_on_the_same_file(tmp_path, tiny_ckpt):
    pytest.importorskip("llama_cpp")
    from nima_edge.export import export
    gguf = export(tiny_ckpt, "gguf", tmp_path / "t.gguf", "q8_0")
    row = time_peer(gguf, "gguf", 1, PROMPT, NEW, runs=2, warmup=1)
    check_timed(row, "llama-bench")
    assert f"-pg {PROMPT},{NEW - 1}" in row["peer_cmd"]


def test_a_peer_that_cannot_run_says_why(tmp_path, monkeypatch, tiny_ckpt):
    monkeypatch.setenv(OPTIMUM_PYTHON, sys.executable)  # ours: transformers 5, no optimum
    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    row = time_peer(tmp_path / "m.onnx", "onnx-portable", 1, PROMPT, NEW, runs=1, warmup=0)
    assert row["peer_error"]
    assert "not a portable .onnx file" in time_peer(tmp_path, "onnx-portable", 1, PROMPT, NEW, 1, 0)["peer_error"]
    assert "no peer tool" in time_peer(tiny_ckpt, "torch", 1, PROMPT, NEW, runs=1, warmup=0)["peer_error"]


@pytest.mark.parametrize("limit, code", [(1000.0, 0), (1e-6, 1)])
def test_compare_peers_gates_on_the_profile_ratio(tmp_path, tiny_onnx, limit, code):
    prof = tmp_path / "p.toml"
    prof.write_text(f'name = "tiny"\nhardware = "test"\nthreads = 1\nruns = 2\nwarmup = 1\nnew_tokens = {NEW}\n'
                    f"budget_ms = 100000.0\npeer_ratio_limit = {limit}\n")
    out = subprocess.run([sys.executable, "-m", "nima_edge", "bench", str(tiny_onnx), "--profile", str(prof),
                          "--out", str(tmp_path / "b"), "--compare-peers"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == code, out.stderr[-2000:]
    (row,) = json.loads((tmp_path / "b" / "bench.json").read_text())["results"]
    assert row["peer_ratio"] == pytest.approx(row["gen_ms_median"] / row["peer_ms_median"])
    assert row["rounds"] == 2 and len(row["peer_ms_runs"]) == 4 and row["peer_ok"] == (code == 0)
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "onnxruntime-genai Generator loop" in md and ("SLOWER" in md) == (code == 1)
