"""The aarch64 check (`make arm-check`, benchmarks/arm64_qemu.py): its pass rule and its wheel fetching
here; the whole check under qemu-user is `slow` (it builds an arm64 root the first time)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtimes" / "arm"))
from aarch64_requires import aarch64_requires  # noqa: E402

from nima_edge.benchmarks.arm64_qemu import judge, missing_wheels  # noqa: E402


def wheel(tmp_path: Path, requires: list[str]) -> Path:
    path = tmp_path / "demo-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("demo-1.0.dist-info/METADATA", meta)
    return path


def test_aarch64_requirements_follow_the_target_not_this_host(tmp_path):
    # executorch 1.5.1's own lines: coremltools and scikit-learn are x86_64 (and macOS) only
    req = wheel(tmp_path, [
        "numpy>=2.0.0; python_version >= \"3.10\"", "torchao<0.19,>=0.18.0",
        "coremltools==9.0; (platform_system == \"Darwin\" or (platform_system == \"Linux\" and "
        "platform_machine == \"x86_64\")) and python_version < \"3.14\"",
        "tosa-tools==2026.5.0; extra == \"vgf\"", "pywin32; sys_platform == \"win32\"",
        "arm-only; platform_machine == \"aarch64\""])
    assert aarch64_requires(str(req)) == ["numpy>=2.0.0", "torchao<0.19,>=0.18.0", "arm-only"]


def manifest(tokens, min_agreement):
    return {"verify": {"self_check": {"tokens": tokens, "min_agreement": min_agreement}}}


def run(tokens, passed=True, agreement=1.0, exit=0):
    return {"exit": exit, "self_check": {"tokens": tokens, "passed": passed, "agreement": agreement}}


def test_float_artifacts_must_match_x86_exactly():
    ids = list(range(10, 26))
    assert judge("gguf", "f32", manifest(ids, 1.0), run(ids), run(ids))["passed"]
    other = ids[:15] + [99]  # the last token differs: a float artifact fails, even though its self-check passed
    verdict = judge("executorch", "fp32", manifest(ids, 1.0), run(ids), run(other, agreement=15 / 16))
    assert not verdict["passed"] and not verdict["identical_to_x86"]
    assert not judge("onnx-portable", "f32", manifest(ids, 1.0), run(ids), run(ids, exit=1))["passed"]


def test_quantized_artifacts_are_held_to_verify_tolerance():
    ids = list(range(10, 26))
    drifted = ids[:8] + [99] * 8  # free-running drift after a near-tie: allowed when the self-check passes
    verdict = judge("gguf", "q4_0", manifest(ids, 0.2), run(ids), run(drifted, agreement=0.9))
    assert verdict["passed"] and not verdict["identical_to_x86"]
    assert not judge("executorch", "8da4w", manifest(ids, 0.2), run(ids), run(drifted, False, 0.1))["passed"]


def test_a_runtime_missing_on_aarch64_is_not_run_never_passed():
    ids = list(range(10, 26))
    verdict = judge("executorch", "fp32", manifest(ids, 1.0), run(ids), {"not_run": "torch does not import"})
    assert verdict["status"] == "NOT RUN" and not verdict["passed"] and verdict["rule"] == "torch does not import"


def test_the_report_names_every_missing_wheel_once():
    # build_env.sh probes each requirement (each extra of cuda-toolkit on its own): pip names one per line
    record = ("ERROR: No matching distribution found for nvidia-cublas==13.1.1.3.* (from cuda-toolkit[cublas])\n"
              "ERROR: No matching distribution found for nvidia-cublas==13.1.1.3.* (from cuda-toolkit[cusolver])\n"
              "ERROR: No matching distribution found for nvidia-cudnn-cu13==9.20.0.48\n")
    assert missing_wheels(record) == ["nvidia-cublas==13.1.1.3.*", "nvidia-cudnn-cu13==9.20.0.48"]
    assert missing_wheels("pip crashed\n") == ["pip crashed"]  # never an empty reason


def test_build_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "runtimes" / "arm" / "build_env.sh")], check=True)


def qemu_ready() -> str | None:
    """Why the qemu check cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs an ARM board, or root to emulate one with qemu-user (binfmt_misc, chroot)"
    if not Path("/proc/sys/fs/binfmt_misc").is_dir():
        return "needs an ARM board, or a kernel with binfmt_misc to emulate one"
    return None


@pytest.mark.slow
def test_arm_check_under_qemu(tiny_ckpt, tmp_path):
    """The whole check on the tiny checkpoint: every artifact kind on aarch64, tokens as on x86."""
    if reason := qemu_ready():
        pytest.skip(reason)
    from nima_edge.benchmarks import arm64_qemu
    rc = arm64_qemu.main(["--ckpt", str(tiny_ckpt), "--work", str(tmp_path / "work"), "--report",
                          str(tmp_path / "report"), "--runs", "1"])
    report = (tmp_path / "report" / "README.md").read_text()
    assert rc == 0, report
    results = json.loads((tmp_path / "report" / "results.json").read_text())["artifacts"]
    assert len(results) == 8 and all(r["judge"]["status"] != "FAIL" for r in results.values())
    # gguf and ONNX always run; ExecuTorch only where an importable aarch64 torch exists (the report says why not)
    assert all(r["judge"]["status"] == "PASS" for r in results.values() if r["target"] != "executorch")
