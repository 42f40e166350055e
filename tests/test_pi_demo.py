"""The Raspberry Pi / Linux demo runs here too (x86): ExecuTorch and llama.cpp backends, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "android_demo" / "pi_demo.py"


def run_demo(*args):
    return subprocess.run([sys.executable, str(DEMO), *map(str, args)], capture_output=True, text=True, timeout=300)


def check_report(proc, tokens):
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= report["tokens"] <= tokens and report["median_ms"] > 0 and report["tokens_per_s"] > 0
    assert isinstance(report["budget_met"], bool) and report["threads"] == 2
    assert "ROMEO:" in proc.stdout and "budget: " in proc.stdout
    return report


def test_pi_demo_executorch(tiny_pte):
    report = check_report(run_demo(tiny_pte, "--threads", 2, "--runs", 2, "--tokens", 20, "--json"), 20)
    assert report["backend"] == "executorch"


def test_pi_demo_llamacpp(tiny_ckpt, tmp_path):
    pytest.importorskip("llama_cpp", reason="the gguf extra is not installed")
    from nima_edge.export import EXPORTERS, export
    if "gguf" not in EXPORTERS:
        pytest.skip("the gguf exporter is not registered")
    gguf = export(tiny_ckpt, "gguf", tmp_path / "tiny.gguf", "q8_0")
    report = check_report(run_demo(gguf, "--threads", 2, "--runs", 2, "--tokens", 20, "--json"), 20)
    assert report["backend"] == "llama.cpp"


def test_pi_demo_bad_input(tmp_path):
    proc = run_demo(tmp_path / "missing")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    (tmp_path / "model.bin").write_bytes(b"x")
    proc = run_demo(tmp_path / "model.bin")
    assert proc.returncode != 0 and "fix: nima-edge export" in proc.stderr
