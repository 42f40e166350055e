"""The latency harness behind `nima-edge bench`.

Each artifact is timed in its own child process (`python -m nima_edge.benchmarks.harness PATH ...`),
so peak memory is its own and a native crash in one runtime cannot take the others down.
Timing: a 16-token prompt (BOS + text), then 50 greedy tokens with no early stop; the first runs
are warm-up; the reported "gen" time is prefill start to the 50th token, i.e. what a user waits.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from nima_edge.errors import NimaError

PROMPT_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak. All: Speak, speak. "
               "You are all resolved rather to die than to famish?")
PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass
class Profile:
    name: str
    hardware: str
    threads: int = 2
    targets: list[str] = field(default_factory=lambda: ["torch", "gguf", "onnx", "onnx-portable", "executorch"])
    budget_ms: float = 100.0          # for `new_tokens` tokens after a `prompt_tokens` prompt
    prompt_tokens: int = 16
    new_tokens: int = 50
    runs: int = 7
    warmup: int = 2
    regression_threshold: float = 0.10  # flag a median slower than baseline by more than this fraction


def load_profile(name_or_path: str | Path) -> Profile:
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(PROFILE_DIR.glob("*.toml")))
        raise NimaError(f"no benchmark profile {name_or_path}", f"pass a TOML file or one of: {known}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise NimaError(f"{path} is not valid TOML: {e}", "fix the profile file") from e
    allowed = {f.name for f in fields(Profile)}
    if unknown := set(raw) - allowed:
        raise NimaError(f"{path}: unknown keys {sorted(unknown)}", f"allowed keys: {', '.join(sorted(allowed))}")
    if missing := {"name", "hardware"} - set(raw):
        raise NimaError(f"{path}: missing {sorted(missing)}", "every profile names its name and hardware")
    profile = Profile(**raw)
    if profile.runs < 1 or profile.new_tokens < 1 or profile.prompt_tokens < 1 or profile.budget_ms <= 0:
        raise NimaError(f"{path}: runs, new_tokens, prompt_tokens and budget_ms must be positive", "fix the profile")
    return profile


def time_artifact(path: str, target: str | None, threads: int, prompt_tokens: int, new_tokens: int,
                  runs: int, warmup: int) -> dict:
    """Run in the child process: load, warm up, time; returns one result row."""
    from nima_edge.manifest import describe_files
    from nima_edge.runtimes import detect_target, load_runtime
    target = target or detect_target(path)
    t0 = time.perf_counter()
    rt = load_runtime(path, target, threads=threads)
    load_s = time.perf_counter() - t0
    prompt = rt.tokenize(PROMPT_TEXT)[:prompt_tokens]
    if len(prompt) < prompt_tokens:
        raise NimaError(f"the benchmark prompt is only {len(prompt)} tokens", "lower prompt_tokens in the profile")
    ttft, gen = [], []
    for run in range(warmup + runs):
        rt.reset()
        start = time.perf_counter()
        tok = int(np.argmax(rt.prefill(prompt)))
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = int(np.argmax(rt.decode(tok)))
        end = time.perf_counter()
        if run >= warmup:
            ttft.append((first - start) * 1e3)
            gen.append((end - start) * 1e3)
    rt.close()
    p = Path(path)
    return {
        "artifact": str(p), "name": p.name, "target": target,
        "bytes": sum(f["bytes"] for f in describe_files(p)),
        "threads": threads, "load_s": load_s,
        "ttft_ms_median": statistics.median(ttft),
        "gen_ms_median": statistics.median(gen), "gen_ms_p90": float(np.percentile(gen, 90)),
        "gen_ms_runs": gen,
        "tokens_per_s": new_tokens / (statistics.median(gen) / 1e3),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space made at exec, whereas
    ru_maxrss survives exec and would report the (larger) parent that forked this child."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other OSes: best effort


def bench_in_subprocess(path: Path, profile: Profile, target: str | None = None, timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "nima_edge.benchmarks.harness", str(path), "--threads", str(profile.threads),
           "--prompt-tokens", str(profile.prompt_tokens), "--new-tokens", str(profile.new_tokens),
           "--runs", str(profile.runs), "--warmup", str(profile.warmup)] + (["--target", target] if target else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"artifact": str(path), "name": Path(path).name, "target": target,
                "error": (proc.stderr.strip() or f"exit code {proc.returncode}")[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def judge(results: list[dict], profile: Profile, baseline: dict | None) -> list[dict]:
    """Attach budget and regression verdicts to each row."""
    base = {(r["name"], r.get("target")): r for r in (baseline or {}).get("results", []) if "gen_ms_median" in r}
    for r in results:
        if "error" in r:
            r["within_budget"] = False
            continue
        r["budget_ms"] = profile.budget_ms
        r["within_budget"] = r["gen_ms_median"] < profile.budget_ms
        if (b := base.get((r["name"], r["target"]))) is not None:
            r["baseline_gen_ms"] = b["gen_ms_median"]
            r["regression"] = r["gen_ms_median"] > b["gen_ms_median"] * (1 + profile.regression_threshold)
    return results


def markdown_table(results: list[dict], profile: Profile) -> str:
    lines = [f"Profile `{profile.name}` ({profile.hardware}), {profile.threads} threads: {profile.new_tokens} tokens "
             f"after a {profile.prompt_tokens}-token prompt, median of {profile.runs} runs; budget "
             f"{profile.budget_ms:g} ms.", "",
             "| artifact | target | size (MB) | TTFT (ms) | gen median (ms) | gen p90 (ms) | tokens/s | peak RSS (MB) | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('target') or '?'} | | | | | | | ERROR: {r['error'].splitlines()[-1][:80]} |")
            continue
        verdict = "ok" if r["within_budget"] else "OVER BUDGET"
        if r.get("regression"):
            verdict += f", REGRESSION vs {r['baseline_gen_ms']:.1f} ms"
        lines.append(f"| {r['name']} | {r['target']} | {r['bytes'] / 1e6:.2f} | {r['ttft_ms_median']:.2f} | "
                     f"{r['gen_ms_median']:.2f} | {r['gen_ms_p90']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {verdict} |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], profile: Profile, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [f"{r['name']} ({r['target']})" for r in rows]
    ax.barh(names, [r["gen_ms_median"] for r in rows],
            xerr=[[0] * len(rows), [r["gen_ms_p90"] - r["gen_ms_median"] for r in rows]],
            color=["tab:green" if r["within_budget"] else "tab:red" for r in rows])
    ax.axvline(profile.budget_ms, color="black", linestyle="--", label=f"budget {profile.budget_ms:g} ms")
    ax.set_xlabel(f"ms for {profile.new_tokens} tokens after a {profile.prompt_tokens}-token prompt (median, p90 whisker)")
    ax.set_title(f"{profile.name}: {profile.hardware}, {profile.threads} threads")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def machine_info() -> dict:
    import platform
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0]}


def run_bench(artifacts: list[Path], profile: Profile, out_dir: Path, baseline: Path | None = None,
              progress=None) -> dict:
    from nima_edge.atomic import write_text
    from nima_edge.manifest import manifest_path, update_manifest
    base = json.loads(baseline.read_text()) if baseline else None
    if missing := [str(p) for p in artifacts if not Path(p).exists()]:  # before minutes of timing, not after
        raise NimaError(f"artifact(s) {', '.join(missing)} do not exist", "pass paths written by nima-edge export")
    results = []
    for path in artifacts:
        row = bench_in_subprocess(Path(path), profile)
        results.append(row)
        if progress:
            progress(row)
    judge(results, profile, base)
    report = {"profile": asdict(profile), "machine": machine_info(), "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    write_text(out_dir / "bench.md", markdown_table(results, profile))
    chart(results, profile, out_dir / "bench.png")
    for r in results:
        if "error" not in r and manifest_path(r["artifact"]).is_file():
            update_manifest(r["artifact"], "bench", {k: v for k, v in r.items() if k != "artifact"})
    report["passed"] = all(r["within_budget"] and not r.get("regression") for r in results)
    return report


def _child_main() -> None:
    ap = argparse.ArgumentParser(description="time one artifact (used by nima-edge bench)")
    ap.add_argument("path")
    ap.add_argument("--target")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    try:
        row = time_artifact(a.path, a.target, a.threads, a.prompt_tokens, a.new_tokens, a.runs, a.warmup)
    except NimaError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row))


if __name__ == "__main__":
    _child_main()
