"""The latency suite: nima-1m and nima-10m artifacts for every target available here, verified and benched.

    python -m nima_edge.benchmarks.suite --out benchmarks/reports/desktop-cpu [--profile desktop-cpu]

Prepares tinyshakespeare-style data (or --data), trains each preset for --minutes (or takes
--ckpt-1m / --ckpt-10m), quantizes with GPTQ, exports every planned artifact (nima_edge.pipeline.PLAN),
verifies each against PyTorch, and benches them all under one profile. Writes bench.json / bench.md /
bench.png and verify.json into --out. On a Pi or a phone, see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from nima_edge.atomic import write_text
from nima_edge.benchmarks.harness import load_profile, run_bench
from nima_edge.pipeline import build_all, verify_all


def trained(preset: str, ckpt: Path | None, data_dir: Path, work: Path, minutes: float, log) -> Path:
    if ckpt is not None:
        return ckpt
    from nima_edge.train.recipe import build_config
    from nima_edge.train.trainer import train
    out = work / preset
    if not (out / "model.safetensors").is_file():
        log(f"training {preset} for {minutes:g} min")
        train(data_dir, out, build_config(None, {"preset": preset, "max_seconds": minutes * 60}), log=log)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/desktop-cpu"))
    ap.add_argument("--work", type=Path, default=Path("runs/suite"), help="checkpoints and artifacts (not committed)")
    ap.add_argument("--profile", default="desktop-cpu")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--data", type=Path, help="prepared data directory (default: prepare --corpus)")
    ap.add_argument("--ckpt-1m", type=Path)
    ap.add_argument("--ckpt-10m", type=Path)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per preset when no checkpoint is given")
    a = ap.parse_args(argv)
    console = Console()
    log = console.print
    profile = load_profile(a.profile)
    data_dir = a.data
    if data_dir is None:
        from nima_edge.data import prepare
        data_dir = a.work / "data"
        if not (data_dir / "meta.json").is_file():
            prepare(a.corpus, data_dir, "char")
    artifacts, skipped = [], []
    for preset, ckpt in (("nima-1m", a.ckpt_1m), ("nima-10m", a.ckpt_10m)):
        ckpt = trained(preset, ckpt, data_dir, a.work, a.minutes, log)
        built, why = build_all(ckpt, a.work / "artifacts", data_dir, log=log, prefix=f"{preset}-")
        artifacts += built
        skipped += [f"{preset} {s}" for s in why]
    reports = verify_all(artifacts, data_dir, log=log)
    bench = run_bench(artifacts, profile, a.out, progress=lambda r: log(f"  {r['name']}: {r.get('gen_ms_median', 'error')}"))
    summary = {name: {k: r[k] for k in ("passed", "checks", "quant", "reference", "logits_max_abs",
                                         "greedy_agreement", "greedy_prefix", "perplexity", "target")} for name, r in reports.items()}
    write_text(a.out / "verify.json", json.dumps({"verify": summary, "skipped": skipped}, indent=2) + "\n")
    print((a.out / "bench.md").read_text())
    for s in skipped:
        log(f"[yellow]skipped[/] {s}")
    return 0 if bench["passed"] and all(r["passed"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
