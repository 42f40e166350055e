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
DEVICE_KEYS = {"dram_read_gbs", "cache_read_gbs", "cache_bytes", "gemm_gflops", "citation"}


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
    peer_ratio_limit: float = 1.15    # --compare-peers: ours may be at most this many times the peer tool's time
    device: dict | None = None        # published figures for projections elsewhere (benchmarks/roofline.py)

    def projects_here(self) -> bool:
        """A device profile run on another kind of machine (x86) projects; it never claims to measure.
        Both device profiles are arm64, so an arm64 host runs them for real."""
        import platform
        return self.device is not None and platform.machine().lower() not in ("aarch64", "arm64")

    def host_threads(self) -> int:
        """Threads to time with here: the profile's, but no more than this machine's cores when projecting."""
        return min(self.threads, os.cpu_count() or 1) if self.projects_here() else self.threads
    timeout_s: float = 600.0          # an artifact still running after this long is marked timed out


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
    from nima_edge import targets
    if unknown := [t for t in profile.targets if t not in targets.TARGETS]:
        raise NimaError(f"{path}: unknown targets {unknown}", f"targets are: {', '.join(targets.TARGETS)}")
    if profile.device is not None and (missing := DEVICE_KEYS - set(profile.device)):
        raise NimaError(f"{path}: [device] lacks {sorted(missing)}", f"a [device] table gives {', '.join(sorted(DEVICE_KEYS))}")
    return profile


def time_artifact(path: str, target: str | None, threads: int, prompt_tokens: int, new_tokens: int,
                  runs: int, warmup: int) -> dict:
    """Run in the child process: load, warm up, time; returns one result row."""
    from nima_edge.manifest import check_files, describe_files, manifest_path
    from nima_edge.runtimes import detect_target, load_runtime
    if manifest_path(path).is_file():
        check_files(path)  # time the files that were exported and verified, or say they changed
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


def bench_in_subprocess(path: Path, profile: Profile, target: str | None = None, timeout: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "nima_edge.benchmarks.harness", str(path), "--threads", str(profile.host_threads()),
           "--prompt-tokens", str(profile.prompt_tokens), "--new-tokens", str(profile.new_tokens),
           "--runs", str(profile.runs), "--warmup", str(profile.warmup)] + (["--target", target] if target else [])
    timeout = profile.timeout_s if timeout is None else timeout
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung artifact is a result, not the end of the bench
        return {"artifact": str(path), "name": Path(path).name, "target": target, "timed_out": True,
                "error": f"timed out after {timeout:g} s (the profile's timeout_s)"}
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
    from nima_edge.errors import require
    require("matplotlib", "train", "the bench chart (bench.png)").use("Agg")
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


def merge_rounds(rows: list[dict]) -> dict:
    """One row from several interleaved rounds of the same artifact: all runs pooled."""
    ok = [r for r in rows if "error" not in r]
    if len(ok) < len(rows):
        return next(r for r in rows if "error" in r)
    row = dict(ok[0])
    for key in ("gen_ms_runs", "ttft_ms_runs"):
        row[key] = [t for r in ok for t in r.get(key, [])]
    row["gen_ms_median"] = statistics.median(row["gen_ms_runs"])
    row["gen_ms_p90"] = float(np.percentile(row["gen_ms_runs"], 90))
    row["ttft_ms_median"] = statistics.median(r["ttft_ms_median"] for r in ok)
    row["tokens_per_s"] = row["tokens_per_s"] * ok[0]["gen_ms_median"] / row["gen_ms_median"]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    row["rounds"] = len(ok)
    return row


def time_with_peer(path: Path, profile: Profile, rounds: int) -> dict:
    """Ours and the runtime's own tool, alternated `rounds` times, so that load from other processes
    falls on both alike; the row carries both and their ratio."""
    from nima_edge.benchmarks.peers import time_peer
    from nima_edge.runtimes import detect_target
    ours, peer = [], []
    for _ in range(rounds):
        ours.append(bench_in_subprocess(path, profile))
        if "error" in ours[-1]:
            break
        peer.append(time_peer(path, ours[-1]["target"] or detect_target(path), profile.host_threads(),
                              profile.prompt_tokens, profile.new_tokens, profile.runs, profile.warmup))
        if "peer_error" in peer[-1]:
            break
    row = merge_rounds(ours)
    if "error" in row:
        return row
    if failed := [p for p in peer if "peer_error" in p]:
        row["peer_error"] = failed[0]["peer_error"]
        return row
    row.update({k: v for k, v in peer[0].items() if k != "peer_ms_runs"})
    row["peer_ms_runs"] = [t for p in peer for t in p["peer_ms_runs"]]
    row["peer_ms_median"] = statistics.median(row["peer_ms_runs"])
    row["peer_ratio"] = row["gen_ms_median"] / row["peer_ms_median"]
    return row


def run_bench(artifacts: list[Path], profile: Profile, out_dir: Path, baseline: Path | None = None,
              progress=None, compare_peers: bool = False, rounds: int = 2) -> dict:
    """Time every artifact (with its peer tool, interleaved, when compare_peers), put each against this
    machine's floor, and, for a device profile on another machine, project to the device."""
    from nima_edge.atomic import write_text
    from nima_edge.benchmarks import roofline
    from nima_edge.manifest import manifest_path, update_manifest
    base = json.loads(baseline.read_text()) if baseline else None
    if missing := [str(p) for p in artifacts if not Path(p).exists()]:  # before minutes of timing, not after
        raise NimaError(f"artifact(s) {', '.join(missing)} do not exist", "pass paths written by nima-edge export")
    from nima_edge.runtimes import detect_target
    if foreign := [f"{p} ({t})" for p in artifacts if (t := detect_target(p)) not in profile.targets]:
        raise NimaError(f"profile {profile.name} does not run {', '.join(foreign)}",
                        f"it runs {', '.join(profile.targets)}; pick a profile that lists the target")
    load_before = os.getloadavg()[0]
    here = roofline.measure_machine(profile.host_threads())  # once per run, before the load we add
    results = []
    for path in artifacts:
        row = time_with_peer(Path(path), profile, rounds) if compare_peers else bench_in_subprocess(Path(path), profile)
        results.append(row)
        if progress:
            progress(row)
    judge(results, profile, base)
    roofline.attach_floors(results, here, profile.prompt_tokens, profile.new_tokens)
    roofline.attach_predictions(results, profile.prompt_tokens, profile.new_tokens)
    device = roofline.profile_machine(profile.device, profile.threads) if profile.projects_here() else None
    if device is not None:
        roofline.attach_projections(results, here, device, profile.prompt_tokens, profile.new_tokens,
                                    profile.budget_ms)
    if compare_peers:
        for r in results:
            if "peer_ratio" in r:
                r["peer_ok"] = r["peer_ratio"] <= profile.peer_ratio_limit
    info = {**machine_info(), "roofline": asdict(here), "load_avg_1m_before": load_before}
    report = {"profile": asdict(profile), "machine": info, "results": results,
              "projection": asdict(device) if device else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    md = markdown_table(results, profile) if device is None else roofline.projection_table(results, profile, device)
    write_text(out_dir / "bench.md", md + "\n" + roofline.floor_table(results, profile, here, compare_peers))
    chart(results, profile, out_dir / "bench.png")
    if device is None:  # a projection is not a measurement of the artifact on this profile's hardware
        for r in results:
            if "error" not in r and manifest_path(r["artifact"]).is_file():
                update_manifest(r["artifact"], "bench", {k: v for k, v in r.items() if k != "artifact"})
    verdict = "projected_within_budget" if device is not None else "within_budget"
    report["passed"] = all(r.get(verdict) and not r.get("regression") and r.get("peer_ok", True) for r in results)
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
