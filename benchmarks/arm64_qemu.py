"""`make arm-check`: every device-side artifact kind, exported on this x86 machine, run on aarch64.

1. Builds (once, cached) the arm64 environment: runtimes/arm/build_env.sh (Debian arm64 root under
   qemu-user, aarch64 wheels, llama.cpp cross-compiled), with the same releases as this environment.
2. Exports and verifies a checkpoint to gguf f32/q8_0/q4_0, executorch fp32/8da8w/8da4w and
   onnx-portable f32/int4 here (verify records the first greedy tokens in each manifest).
3. Runs android_demo/pi_demo.py on each artifact here and in the arm64 root (chroot, emulated), the
   gguf and ONNX ones with a site folder that holds no torch and no nima-edge.
4. Checks: a float artifact's aarch64 greedy tokens equal x86's exactly; a quantized one agrees with the
   verified tokens (teacher-forced) at least as often as verify's tolerance for its scheme. Writes
   results.json and README.md to --report; exit 1 when any artifact fails.

Timings in the report are qemu-emulated (an x86 core interpreting ARM code): not device speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from nima_edge.cache import cache_root

REPO = Path(__file__).resolve().parents[1]
BUILD_ENV = REPO / "runtimes" / "arm" / "build_env.sh"
PI_DEMO = REPO / "android_demo" / "pi_demo.py"
CORPUS = REPO / "tests" / "data" / "tinyshakespeare-300k.txt"
CACHE = Path(os.environ.get("NIMA_ARM64_CACHE", cache_root() / "arm64"))
TARGETS = ("gguf", "executorch", "onnx-portable")
# Site folders inside the root (build_env.sh): gguf and ONNX run with "lean" alone (no torch on the path).
SITES = {"gguf": ["/opt/nima/lean"], "onnx-portable": ["/opt/nima/lean"],
         "executorch": ["/opt/nima/et", "/opt/nima/torch"]}
GUEST_DIR = "/opt/nima-check"
# x86 distribution -> environment variable build_env.sh reads, so both sides run the same release
PINNED = {"llama_cpp_python": "LLAMA_CPP_PYTHON_VERSION", "executorch": "EXECUTORCH_VERSION",
          "torch": "TORCH_VERSION", "onnxruntime": "ONNXRUNTIME_VERSION",
          "onnxruntime-genai": "ONNXRUNTIME_GENAI_VERSION", "tokenizers": "TOKENIZERS_VERSION"}


def log(msg: str) -> None:
    print(f"[arm-check] {msg}", file=sys.stderr, flush=True)


def x86_versions() -> dict[str, str]:
    out = {}
    for dist in PINNED:
        try:
            out[dist] = metadata.version(dist).split("+")[0]
        except metadata.PackageNotFoundError:
            pass
    return out


def build_env(versions: dict[str, str]) -> None:
    env = {**os.environ, **{PINNED[d]: v for d, v in versions.items()}, "NIMA_ARM64_CACHE": str(CACHE)}
    subprocess.run(["bash", str(BUILD_ENV)], env=env, check=True)


def checkpoint(ckpt: Path | None, work: Path, minutes: float) -> tuple[Path, Path]:
    """The checkpoint to export and the prepared data its GPTQ results and verify use."""
    from nima_edge.pipeline import prepared_data, trained_checkpoint
    data = work / "data-char"
    prepared_data(str(CORPUS), data, "char")
    if ckpt is None:
        log(f"training nima-1m for {minutes} min (reused when {work / 'nima-1m'} exists)")
        ckpt, _ = trained_checkpoint("nima-1m", data, work / "nima-1m", minutes, log=lambda *_: None)
    return ckpt, data


def artifacts(ckpt: Path, data: Path, out: Path, kinds: list[str]) -> list[Path]:
    """Export and verify every build of the `kinds` targets; an artifact already exported (or verified)
    from this checkpoint is reused."""
    from nima_edge import targets
    from nima_edge.checkpoint import checkpoint_hash
    from nima_edge.manifest import read_manifest
    from nima_edge.pipeline import build_all, verify_all
    sha = checkpoint_hash(ckpt)
    done, unverified, todo = [], [], []
    for b in targets.plan(kinds):
        path = out / b.filename
        try:
            m = read_manifest(path)
        except Exception:  # missing or unreadable: build it
            m = {}
        if "self_check" in m.get("verify", {}) and m["verify"].get("reference_checkpoint", {}).get("sha256") == sha:
            done.append(path)
        elif m.get("source", {}).get("sha256") == sha and m.get("quant") == b.quant:
            unverified.append(path)
        else:
            todo.append(b)
    built = []
    if todo:
        log(f"exporting {', '.join(b.filename for b in todo)}")
        built, skipped = build_all(ckpt, out, data, plan=todo, log=lambda *_: None)
        if skipped:
            raise SystemExit(f"error: cannot export here: {'; '.join(skipped)}\n  fix: pip install -e '.[all]'")
    if built or unverified:
        reports = verify_all(built + unverified, data, log=log)
        failed = [name for name, r in reports.items() if not r["passed"]]
        if failed:
            raise SystemExit(f"error: verify failed on x86 for {', '.join(failed)}: nothing to compare aarch64 with")
        done += built + unverified
    return sorted(done)


def target_of(path: Path) -> str:
    from nima_edge.targets import detect
    return detect(path)


def parse_demo(proc: subprocess.CompletedProcess, seconds: float) -> dict:
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {}
    return {"exit": proc.returncode, "wall_s": round(seconds, 1), **result,
            "self_check_line": next((ln for ln in lines if ln.startswith("self-check:")), None),
            **({"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]} if proc.returncode else {})}


def run_x86(path: Path, args) -> dict:
    cmd = [sys.executable, str(PI_DEMO), str(path), "--threads", str(args.threads), "--runs", str(args.runs), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return parse_demo(proc, time.perf_counter() - start)


@contextmanager
def proc_mounted(root: Path):
    """/proc inside the root for the runs. Not /sys: with the host's /sys (x86 CPU topology) ONNX Runtime's
    cpuinfo crashes under qemu; without it, it warns that it cannot identify the CPU and carries on."""
    mounts = [(["-t", "proc", "proc"], root / "proc")]
    done = []
    try:
        for how, target in mounts:
            if not os.path.ismount(target):
                target.mkdir(exist_ok=True)
                subprocess.run(["mount", *how, str(target)], check=True)
                done.append(target)
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", str(target)], check=False)


def guest(root: Path, sites: list[str], argv: list[str], timeout: int = 1800) -> tuple[subprocess.CompletedProcess, float]:
    """Run python3 in the arm64 root with only `sites` on its path (env -i: nothing from this host)."""
    env = ["PATH=/usr/bin:/bin", "HOME=/root", "LANG=C.UTF-8", f"PYTHONPATH={':'.join(sites)}",
           "LLAMA_CPP_LIB_PATH=/opt/nima/llama-lib"]
    cmd = ["chroot", str(root), "/usr/bin/env", "-i", *env, "/usr/bin/python3", "-s", *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


PROBE = """
import importlib.util as u, json, platform, sys
from importlib import metadata
def version(d):
    try: return metadata.version(d)
    except metadata.PackageNotFoundError: return None
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "libc": platform.libc_ver()[1],
                  "torch_importable": u.find_spec("torch") is not None, "nima_edge_importable": u.find_spec("nima_edge") is not None,
                  "versions": {d: version(d) for d in sys.argv[1:]}}))
"""


def probe(root: Path, sites: list[str], dists: list[str]) -> dict:
    proc, _ = guest(root, sites, ["-c", PROBE, *dists], timeout=600)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout)


def run_arm(root: Path, path: Path, target: str, args) -> dict:
    argv = [f"{GUEST_DIR}/pi_demo.py", f"{GUEST_DIR}/artifacts/{path.name}", "--threads", str(args.threads),
            "--runs", str(args.runs), "--json"]
    proc, seconds = guest(root, SITES[target], argv)
    return parse_demo(proc, seconds)


def judge(target: str, quant: str, manifest: dict, x86: dict, arm: dict) -> dict:
    """PASS, FAIL, or NOT RUN (the runtime cannot be installed on aarch64 here: `arm` says why)."""
    from nima_edge.targets import precision_class
    float_model = precision_class(target, quant).startswith("float")
    expected = manifest["verify"]["self_check"]["tokens"]
    sc_x86, sc_arm = x86.get("self_check") or {}, arm.get("self_check") or {}
    identical = bool(sc_arm) and sc_arm.get("tokens") == sc_x86.get("tokens")
    if "not_run" in arm:
        passed, why = False, arm["not_run"]
    elif arm.get("exit") != 0 or not sc_arm:
        passed, why = False, "the aarch64 run failed"
    elif float_model:
        passed, why = identical and sc_arm["tokens"] == expected, "float: aarch64 tokens must equal x86's exactly"
    else:
        passed, why = bool(sc_arm.get("passed")), "quantized: teacher-forced agreement within verify's tolerance"
    status = "NOT RUN" if "not_run" in arm else "PASS" if passed else "FAIL"
    return {"status": status, "passed": passed, "rule": why, "identical_to_x86": identical, "expected": expected,
            "x86_tokens": sc_x86.get("tokens"), "arm_tokens": sc_arm.get("tokens"),
            "arm_agreement": sc_arm.get("agreement"), "min_agreement": manifest["verify"]["self_check"]["min_agreement"]}


def missing_wheels(pip_errors: str) -> list[str]:
    """The distinct requirements in build_env.sh's record of pip's "No matching distribution found for X"."""
    marker = "No matching distribution found for "
    found = [line.split(marker, 1)[1].split(" (from")[0].strip() for line in pip_errors.splitlines() if marker in line]
    return list(dict.fromkeys(found)) or [pip_errors.strip()]


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def write_report(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    env = results["environment"]
    lines = [
        "# aarch64 check under qemu-user (`make arm-check`)", "",
        f"Run {results['date']} on {env['host']}. aarch64 code ran in a Debian {env['debian']} arm64 root under "
        f"`{env['qemu']}`: every timing below is **qemu-emulated (an x86 core interpreting ARM code), not device "
        f"speed**, taken on a machine shared with other jobs (load average {env.get('load_average_1_5_15min')} "
        "at the end, 1/5/15 min).", "",
        "Artifacts were exported and verified on x86 from one checkpoint "
        f"(`{results['checkpoint']['name']}`, sha256 {results['checkpoint']['sha256'][:12]}); `pi_demo.py` then ran "
        "each one on x86 and on aarch64. Rule: a float artifact's greedy tokens on aarch64 equal x86's exactly; "
        "a quantized one, fed the verified tokens, picks the same token at least as often as verify's tolerance "
        "for its scheme (teacher-forced, as verify counts greedy agreement).", "",
        "| artifact | runtime (aarch64 site) | result | aarch64 = x86 tokens | agreement (min) | aarch64 50 tok ms (qemu) | x86 50 tok ms |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for name, r in results["artifacts"].items():
        j, arm, x86 = r["judge"], r["aarch64"], r["x86"]
        agree = "-" if j["arm_agreement"] is None else f"{j['arm_agreement']:.2f} ({j['min_agreement']:.2f})"
        ms = lambda d: f"{d['median_ms']:.0f}" if "median_ms" in d else "-"  # noqa: E731
        lines.append(f"| {name} | {arm.get('backend', '-')} ({'+'.join(s.rsplit('/', 1)[1] for s in r['sites'])}) | "
                     f"{j['status']} | {'yes' if j['identical_to_x86'] else 'no'} | {agree} | "
                     f"{ms(arm)} | {ms(x86)} |")
    if env.get("torch_import", "ok") != "ok":
        lines += ["", f"**ExecuTorch on aarch64: not run.** {env['torch_import']}. "
                  f"`executorch` alone (its wheel declares no torch): `{env.get('executorch_without_torch')}`."]
    lines += ["", "## Greedy tokens (the first 16 after the verify prompt)", ""]
    for name, r in results["artifacts"].items():
        j = r["judge"]
        lines += [f"- `{name}`: verified {j['expected']}", f"  - x86 {j['x86_tokens']}", f"  - aarch64 {j['arm_tokens']}"]
        if r["aarch64"].get("error"):
            lines.append(f"  - aarch64 error: `{r['aarch64']['error']}`")
        if j["status"] == "NOT RUN":
            lines.append(f"  - not run on aarch64: {j['rule']}")
    lines += ["", "## Environments", "", "```json", json.dumps(env, indent=1), "```", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, help="checkpoint to export (default: train nima-1m briefly, once)")
    p.add_argument("--minutes", type=float, default=2.0, help="training time when no --ckpt is given")
    p.add_argument("--work", type=Path, default=CACHE / "check", help="where checkpoints and artifacts go")
    p.add_argument("--report", type=Path, default=REPO / "benchmarks" / "reports" / "arm64-qemu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=2, help="timed runs per artifact after one warm-up")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="artifact kinds to check")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("error: the arm64 check needs root (binfmt_misc, chroot)\n  fix: run make arm-check as root")

    versions = x86_versions()
    log("building the arm64 environment (once; cached in %s)" % CACHE)
    build_env(versions)
    root = CACHE / "rootfs"
    ckpt, data = checkpoint(args.ckpt, args.work, args.minutes)
    arts = artifacts(ckpt, data, args.work / "artifacts", args.targets)

    guest_dir = root / GUEST_DIR.lstrip("/")
    shutil.rmtree(guest_dir, ignore_errors=True)
    (guest_dir / "artifacts").mkdir(parents=True)
    shutil.copy2(PI_DEMO, guest_dir / "pi_demo.py")
    for a in arts:
        if a.is_dir():
            shutil.copytree(a, guest_dir / "artifacts" / a.name)
        else:
            shutil.copy2(a, guest_dir / "artifacts" / a.name)
            shutil.copy2(a.with_name(a.name + ".manifest.json"), guest_dir / "artifacts" / (a.name + ".manifest.json"))

    from nima_edge.checkpoint import checkpoint_hash
    from nima_edge.manifest import read_manifest
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "checkpoint": {"name": ckpt.name, "sha256": checkpoint_hash(ckpt)},
               "environment": {"host": f"{platform.machine()} {platform.node()}, {os.cpu_count()} cores",
                               "qemu": qemu_version(), "debian": "bookworm", "x86_versions": versions,
                               "threads": args.threads, "runs": args.runs, "targets": args.targets},
               "artifacts": {}}
    with proc_mounted(root):
        lean = probe(root, SITES["gguf"], ["onnxruntime", "tokenizers", "numpy", "onnxruntime-genai"])
        full = probe(root, SITES["executorch"], ["executorch", "torch", "torchao", "numpy"])
        torch_ok, _ = guest(root, SITES["executorch"], ["-c", "import torch"], 900)
        unavailable = root / "opt" / "nima" / "torch.UNAVAILABLE"
        no_torch = None if torch_ok.returncode == 0 else (
            "executorch's Python runtime links libtorch, and torch does not import on aarch64 here: "
            + (torch_ok.stderr.strip().splitlines() or ["?"])[-1]
            + (f" (PyPI's aarch64 torch is the CUDA build; this package index has no aarch64 wheel of "
               f"{', '.join(missing_wheels(unavailable.read_text()))})" if unavailable.is_file() else ""))
        # what `pip install executorch` alone gives a board (its aarch64 wheel declares no torch)
        bare, _ = guest(root, ["/opt/nima/et"], ["-c", "from executorch.extension.llm.runner import TextLLMRunner"], 600)
        results["environment"].update({
            "aarch64_lean_site": lean, "aarch64_executorch_site": full,
            "executorch_without_torch": "imports" if bare.returncode == 0 else bare.stderr.strip().splitlines()[-1],
            "torch_import": "ok" if no_torch is None else no_torch,
            "llama_cpp": f"llama-cpp-python {versions.get('llama_cpp_python')} package + libllama cross-compiled "
                         f"from its vendored llama.cpp ({os.environ.get('NIMA_ARM_ARCH', 'armv8.2-a+dotprod+fp16')})"})
        for a in arts:
            target, manifest = target_of(a), read_manifest(a)
            log(f"{a.name}: x86")
            x86 = run_x86(a, args)
            log(f"{a.name}: aarch64 (emulated)")
            arm = {"not_run": no_torch} if target == "executorch" and no_torch else run_arm(root, a, target, args)
            results["artifacts"][a.name] = {"target": target, "quant": manifest["quant"], "sites": SITES[target],
                                            "x86": x86, "aarch64": arm,
                                            "judge": judge(target, manifest["quant"], manifest, x86, arm)}
            log(f"{a.name}: {results['artifacts'][a.name]['judge']['status']}")
    results["environment"]["load_average_1_5_15min"] = [round(x, 1) for x in os.getloadavg()]
    write_report(args.report, results)
    status = [r["judge"]["status"] for r in results["artifacts"].values()]
    print(f"arm64 check: {status.count('PASS')} pass, {status.count('FAIL')} fail, {status.count('NOT RUN')} not run "
          f"(no aarch64 runtime here: see the report) of {len(arts)} artifacts; report in {args.report}")
    return 1 if "FAIL" in status or "PASS" not in status else 0


if __name__ == "__main__":
    sys.exit(main())
