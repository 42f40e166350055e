"""The Raspberry Pi / Linux demo runs here too (x86): its three backends, the self-check against the
tokens verify recorded, the device install (no torch, no nima-edge for llama.cpp and ONNX), bad input.
The same script on aarch64: tests/test_arm_check.py and `make arm-check`."""
from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "android_demo" / "pi_demo.py"
# Runs pi_demo with torch and nima_edge unimportable: what a board with only the runtime package has.
WITHOUT_TORCH = ("import runpy, sys; sys.modules.update(torch=None, nima_edge=None); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_demo(*args, lean: bool = False):
    cmd = [sys.executable, "-c", WITHOUT_TORCH] if lean else [sys.executable]
    return subprocess.run([*cmd, str(DEMO), *map(str, args)], capture_output=True, text=True, timeout=300)


def check_report(proc, tokens):
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= report["tokens"] <= tokens and report["median_ms"] > 0 and report["tokens_per_s"] > 0
    assert isinstance(report["budget_met"], bool) and report["threads"] == 2
    assert "ROMEO:" in proc.stdout and "budget: " in proc.stdout
    return report


def demo_args(model, tokens=20):
    return [model, "--threads", 2, "--runs", 2, "--tokens", tokens, "--json"]


def verified(artifact: Path) -> dict:
    """Verify the artifact (writes the self-check tokens into its manifest); return the record."""
    from nima_edge.verify import verify_artifact
    report = verify_artifact(artifact)
    assert report["passed"], report["checks"]
    record = report["self_check"]
    assert len(record["tokens"]) == 16 and record["prompt_ids"][0] == 0  # BOS first
    return record


def check_self_check(report: dict, record: dict) -> None:
    check = report["self_check"]
    assert check["passed"] and check["expected"] == record["tokens"]
    if record["min_agreement"] == 1.0:  # float: the same tokens, free-running and teacher-forced
        assert check["tokens"] == record["tokens"] and check["forced"] == record["tokens"]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from nima_edge.export import export
    return export(tiny_ckpt, "onnx-portable", tmp_path_factory.mktemp("onnx") / "tiny.onnx", "f32")


def test_pi_demo_executorch(tiny_pte, tmp_path):
    pte = shutil.copytree(tiny_pte, tmp_path / "et")  # verify writes the manifest: keep the shared one as it is
    record = verified(pte)
    proc = run_demo(*demo_args(pte))
    report = check_report(proc, 20)
    assert report["backend"] == "executorch" and "self-check: PASS: 16/16" in proc.stdout
    check_self_check(report, record)


def test_pi_demo_llamacpp_without_torch(tiny_ckpt, tmp_path):
    pytest.importorskip("llama_cpp", reason="the gguf extra is not installed")
    from nima_edge.export import export
    gguf = export(tiny_ckpt, "gguf", tmp_path / "tiny.gguf", "q8_0")
    record = verified(gguf)
    report = check_report(run_demo(*demo_args(gguf), lean=True), 20)
    assert report["backend"] == "llama.cpp"
    check_self_check(report, record)


def test_pi_demo_onnx_without_torch(tiny_onnx, tmp_path):
    onnx = shutil.copy2(tiny_onnx, tmp_path / "tiny.onnx")
    shutil.copy2(tiny_onnx.with_name(tiny_onnx.name + ".manifest.json"), tmp_path / "tiny.onnx.manifest.json")
    record = verified(Path(onnx))
    report = check_report(run_demo(*demo_args(onnx), lean=True), 20)
    assert report["backend"] == "onnxruntime" and report["text"]
    check_self_check(report, record)

    # another model's tokens in the manifest: the self-check fails and the exit code says so
    manifest = Path(str(onnx) + ".manifest.json")
    data = json.loads(manifest.read_text())
    tokens = data["verify"]["self_check"]["tokens"]
    data["verify"]["self_check"]["tokens"] = [(t + 1) % 200 + 6 for t in tokens]
    manifest.write_text(json.dumps(data))
    proc = run_demo(*demo_args(onnx), lean=True)
    assert proc.returncode == 1 and "self-check: FAIL" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["self_check"]["passed"] is False

    # no manifest beside the model: said, not failed
    manifest.unlink()
    proc = run_demo(*demo_args(onnx), lean=True)
    assert proc.returncode == 0 and "self-check: skipped" in proc.stdout


def test_pi_demo_mirrors_the_runtime():
    """pi_demo.py cannot import nima-edge on a board, so it copies a few constants: they must not drift."""
    from nima_edge.runtimes import onnx_portable_format as fmt
    from nima_edge.runtimes.onnx_portable import OnnxPortableRuntime
    demo = {}
    exec(compile("\n".join(ln for ln in DEMO.read_text().splitlines() if ln.startswith("ONNX_")), str(DEMO), "exec"), demo)
    assert (demo["ONNX_META_TOKENIZER"], demo["ONNX_META_CONFIG"], demo["ONNX_META_TOKENIZER_SETTINGS"]) == \
        (fmt.META_TOKENIZER, fmt.META_CONFIG, fmt.META_TOKENIZER_SETTINGS)
    default = inspect.signature(OnnxPortableRuntime).parameters["accuracy_level"].default
    assert demo["ONNX_ACCURACY_LEVEL"] == str(default)


def test_pi_demo_bad_input(tmp_path):
    proc = run_demo(tmp_path / "missing")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "model.bin").write_bytes(b"x")
    proc = run_demo(tmp_path / "model.bin")
    assert proc.returncode == 2 and "fix: nima-edge export" in proc.stderr
