"""Measure what verify's tolerance table (nima_edge/verify.py TOLERANCES) is derived from.

    python benchmarks/experiments/verify_tolerances.py --ckpt runs/nima-1m --data data/shakespeare-char \
        --out runs/tolerances [--json tolerances.json]

Exports the checkpoint to every planned target and scheme available on this machine (plus GGUF f16
and llama.cpp's own K-quants, which are held to the float model), verifies each artifact and prints
every measured metric, then per precision class (and reference kind) the worst case observed and
that worst case times MARGIN, rounded up: the table's entries are chosen at or above it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from nima_edge import pipeline, targets
from nima_edge.targets import Build
from nima_edge.verify import verify_artifact

MARGIN = 4.0  # errors x4; agreements: the share of disagreeing tokens x4
EXTRA = [Build("gguf", "f16"), Build("gguf", "q6_k"), Build("gguf", "q4_k_m")]  # float16 and vs-float classes
ERRORS = ("logits_max_abs", "kl_mean", "kl_max", "ppl_rel_delta")
AGREEMENTS = ("greedy_agreement", "top1_agreement")


def up(x: float) -> float:
    """x rounded up to one significant digit (0.00231 -> 0.003)."""
    if x <= 0:
        return 0.0
    e = math.floor(math.log10(x))
    return math.ceil(x / 10 ** e) * 10 ** e


def metrics(r: dict) -> dict:
    return {"logits_max_abs": r["logits_max_abs"], "kl_mean": r["kl_mean"], "kl_max": r["kl_max"],
            "ppl_rel_delta": r["perplexity"]["rel_delta"], "greedy_agreement": r["greedy_agreement"],
            "top1_agreement": r["top1_agreement"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    arts, skipped = pipeline.build_all(args.ckpt, args.out, args.data, targets.plan() + EXTRA)
    rows = []
    for path in arts:
        r = verify_artifact(path, data_dir=args.data, record=False)
        cls = targets.precision_class(r["target"], r["quant"])
        rows.append({"artifact": path.name, "class": cls, "reference": r["reference"], **metrics(r)})
        print(json.dumps(rows[-1]))
    worst = {}
    for row in rows:
        key = f"{row['class']} vs {row['reference']}"
        w = worst.setdefault(key, {k: 0.0 for k in ERRORS} | {k: 1.0 for k in AGREEMENTS})
        for k in ERRORS:
            w[k] = max(w[k], row[k])
        for k in AGREEMENTS:
            w[k] = min(w[k], row[k])
    proposed = {key: {**{k: up(w[k] * MARGIN) for k in ERRORS},
                      **{k: round(1 - up((1 - w[k]) * MARGIN), 3) for k in AGREEMENTS}} for key, w in worst.items()}
    print("worst case per class:", json.dumps(worst, indent=1))
    print(f"x{MARGIN:g} margin:", json.dumps(proposed, indent=1))
    print("not built:", skipped)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.ckpt), "load_average": os.getloadavg(),
                                         "rows": rows, "worst": worst, "proposed": proposed,
                                         "skipped": skipped}, indent=1) + "\n")


if __name__ == "__main__":
    main()
