"""Quantization quality table: validation perplexity of fp32, int8/int4 RTN and GPTQ at several group sizes.

    python benchmarks/quant_quality.py --ckpt runs/nima-1m --data data/shakespeare-char --out docs/quant_quality.md

Every row quantizes the same float checkpoint in memory (the exact code `nima-edge quantize` runs) and
evaluates its fake-quant model on the whole validation split, in windows of the training context
(calibration windows are capped at it too). "gap closed" is, for GPTQ,
(ppl_RTN - ppl_GPTQ) / (ppl_RTN - ppl_fp32) at the same bits and group size.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nima_edge import checkpoint
from nima_edge.atomic import write_text
from nima_edge.data import TokenData
from nima_edge.evaluate import evaluate
from nima_edge.checkpoint import trained_context
from nima_edge.export.quantize import calibration_windows, quantize_model


def run(ckpt: Path, data_dir: Path, bits_list: list[int], groups: list[int], samples: int, length: int,
        max_windows: int | None, act_order: bool) -> dict:
    load_before = os.getloadavg()[0]  # other jobs on the machine change the timings (not the perplexities)
    data = TokenData(data_dir)
    model, _ = checkpoint.load(ckpt)
    context = trained_context(ckpt, model)  # evaluate and calibrate at the length the model was trained on
    length = min(length, context)
    calib = calibration_windows(data, samples, length)

    def ppl(m) -> float:
        return evaluate(m, data, "val", context=context, max_windows=max_windows)["perplexity"]

    fp32 = evaluate(model, data, "val", context=context, max_windows=max_windows)
    rows = [{"scheme": "fp32", "bits": 32, "group": None, "method": "-", "perplexity": fp32["perplexity"],
             "seconds": 0.0}]
    for bits in bits_list:
        for group in groups:
            for method in ("rtn", "gptq"):
                m, _ = checkpoint.load(ckpt)
                t0 = time.perf_counter()
                quantize_model(m, method, bits, group, calib=calib if method == "gptq" else None, act_order=act_order)
                seconds = round(time.perf_counter() - t0, 1)
                rows.append({"scheme": f"int{bits} {method} g{group}", "bits": bits, "group": group, "method": method,
                             "perplexity": ppl(m), "seconds": seconds})
    fp = rows[0]["perplexity"]
    rtn_ppl = {(r["bits"], r["group"]): r["perplexity"] for r in rows if r["method"] == "rtn"}
    for r in rows:
        r["delta_pct"] = 100 * (r["perplexity"] - fp) / fp
        if r["method"] == "gptq":
            gap = rtn_ppl[(r["bits"], r["group"])] - fp
            r["gap_closed"] = (rtn_ppl[(r["bits"], r["group"])] - r["perplexity"]) / gap if gap > 0 else None
    return {"checkpoint": str(ckpt), "data": str(data_dir), "eval_context": context, "eval_tokens": fp32["tokens"],
            "load_average": [load_before, os.getloadavg()[0]], "quantize_threads": 1,
            "calibration": {"samples": samples, "length": length, "act_order": act_order}, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| scheme | val perplexity | vs fp32 | GPTQ closes of the RTN gap | quantize time (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        gap = r.get("gap_closed")
        lines.append(f"| {r['scheme']} | {r['perplexity']:.4f} | {r['delta_pct']:+.2f}% | "
                     f"{'' if gap is None else f'{100 * gap:.0f}%'} | {r['seconds'] if r['bits'] < 32 else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="float checkpoint (e.g. a trained nima-1m)")
    ap.add_argument("--data", type=Path, required=True, help="the prepared data it was trained on")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--samples", type=int, default=64, help="calibration windows")
    ap.add_argument("--length", type=int, default=256, help="calibration window length")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate on this many windows (default: all)")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--out", type=Path, help="write the table here (markdown) and the numbers beside it (.json)")
    args = ap.parse_args()
    result = run(args.ckpt, args.data, args.bits, args.groups, args.samples, args.length, args.max_windows,
                 args.act_order)
    table = Table(title=f"quantization quality, {args.ckpt}")
    for col in ("scheme", "val ppl", "vs fp32", "gap closed", "seconds"):
        table.add_column(col, justify="left" if col == "scheme" else "right")
    for r in result["rows"]:
        gap = r.get("gap_closed")
        table.add_row(r["scheme"], f"{r['perplexity']:.4f}", f"{r['delta_pct']:+.2f}%",
                      "" if gap is None else f"{100 * gap:.0f}%", str(r["seconds"]))
    Console().print(table)
    if args.out:
        write_text(args.out, markdown(result))
        write_text(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
