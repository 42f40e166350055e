"""QAT quality table: int4 perplexity gap to float for RTN, GPTQ and QAT, measured through GGUF Q4_0 artifacts.

    python benchmarks/experiments/qat_quality.py --ckpt runs/nima-1m --data data/shakespeare-char \
        --out runs/qat-quality --steps 300 --groups 32 128 --windows 64

For each group size: RTN and GPTQ quantize the float checkpoint (`nima-edge quantize`); QAT fine-tunes
it on the same training split with `--full --qat int4-gG` for `--steps` steps (all of them with fake
quantization), then `quantize --method qat` reads off the trained codes. Every model is exported to a
GGUF (f32 for the float ones, Q4_0 packed from the result for the int4 ones) and scored by llama.cpp
(llama-cpp-python) on the same evenly spaced validation windows at the training context. A float
fine-tune with the same steps and settings, without QAT, is the control: it is the float model a QAT
model should be held to (QAT's extra steps also train), so each quantized model's gap is measured
against its own float model: RTN and GPTQ against the checkpoint, QAT against the control.
"QAT gap / GPTQ gap" divides those two gaps at the same group size.

Each group also gets GPTQ's result trained as it is (`nima-edge finetune GPTQ --train-quantized`, its
defaults: 300 steps at lr 1e-4, scales and codes, KL to the float weights): no control is needed, its
reference is the float checkpoint, like RTN's and GPTQ's.

QAT through the end of pretraining instead of a fine-tune: train the float model and, with the same
recipe and seed, a second one with `nima-edge train --qat int4-gG --qat-fraction F`; pass the first as
--ckpt and the second as `--qat-run G=RUN`. No fine-tunes then: the QAT model's float reference is the
float checkpoint itself (the same pretraining without fake quantization).

    python benchmarks/experiments/qat_quality.py --ckpt runs/float --qat-run 32=runs/qat-g32 --groups 32 ...
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from nima_edge.atomic import write_text
from nima_edge.evaluate import evaluate_path
from nima_edge.export import export
from nima_edge.export.quantize import quantize_checkpoint
from nima_edge.train import finetune as ft
from nima_edge.train import qat


def score(model: Path, data: Path, windows: int) -> dict:
    r = evaluate_path(model, data, "val", windows, lines=0)
    return {"perplexity": r["perplexity"], "loss": r["loss"], "tokens": r["tokens"], "target": r["target"]}


def finetune(ckpt: Path, data: Path, out: Path, steps: int, scheme: str | None) -> Path:
    if (out / "nima.json").is_file():
        return out  # reuse a finished run (the script is restartable)
    cfg = ft.build_config(ckpt, None, {"max_steps": steps, "eval_every": max(steps // 5, 1), "patience": 0,
                                       "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 10, "batch_size": 16,
                                       **({"qat": scheme, "qat_fraction": 1.0} if scheme else {})})
    settings = ft.FinetuneConfig(full=True)
    ft.finetune(ckpt, data, out, cfg, settings, progress_bar=False)
    return out


def train_result(quantized: Path, data: Path, out: Path) -> Path:
    """`nima-edge finetune QUANTIZED --train-quantized` with the command's defaults."""
    if not (out / "nima.json").is_file():
        ft.finetune(quantized, data, out, ft.build_config(quantized, None, {}, train_quantized=True),
                    ft.FinetuneConfig(train_quantized=True), progress_bar=False)
    return out


def run(ckpt: Path, data: Path, out: Path, steps: int, groups: list[int], windows: int,
        qat_runs: dict[int, Path] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    rows = []

    def add(name: str, model_dir: Path, quant: str, extra: dict | None = None):
        t0 = time.perf_counter()
        art = out / f"{model_dir.name}-{quant}.gguf"
        if not art.is_file():
            export(model_dir, "gguf", art, quant)
        r = {"scheme": name, "checkpoint": str(model_dir), "artifact": str(art), **score(art, data, windows),
             "torch_perplexity": score(model_dir, data, windows)["perplexity"], **(extra or {})}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(r)
        print(f"{name:24s} llama.cpp ppl {r['perplexity']:.4f}  (PyTorch {r['torch_perplexity']:.4f})", flush=True)

    add("float", ckpt, "f32")
    qat_runs = qat_runs or {}
    if set(groups) - set(qat_runs):  # QAT by fine-tuning: the float fine-tune is its control
        add(f"float + {steps} steps", finetune(ckpt, data, out / "float-ft", steps, None), "f32")
    for g in groups:
        for method in ("rtn", "gptq"):
            q = out / f"{method}-g{g}"
            if not (q / "nima.json").is_file():
                quantize_checkpoint(ckpt, q, 4, g, method, data if method == "gptq" else None)
            add(f"int4 {method} g{g}", q, "q4_0")
        add(f"int4 gptq+qat g{g} (--train-quantized)", train_result(q, data, out / f"gptq-qat-g{g}"), "q4_0",
            {"float_reference": "float"})
        trained = qat_runs.get(g) or finetune(ckpt, data, out / f"qat-ft-g{g}", steps, f"int4-g{g}")
        q = out / f"qat-g{g}"
        if not (q / "nima.json").is_file():
            qat.quantize_checkpoint(trained, q)
        add(qat_name(g, steps, g in qat_runs), q, "q4_0", {"float_reference": "float" if g in qat_runs else None})
    load.append(os.getloadavg()[0])
    by = {r["scheme"]: r for r in rows}
    fp = by["float"]["perplexity"]
    for r in rows:
        if not r.get("float_reference"):  # fine-tuned QAT: its control; everything else: the checkpoint
            r["float_reference"] = f"float + {steps} steps" if "qat" in r["scheme"] else "float"
        r["gap_pct"] = 100 * (r["perplexity"] - by[r["float_reference"]]["perplexity"]) / by[r["float_reference"]]["perplexity"]
    for g in groups:
        gptq_gap = by[f"int4 gptq g{g}"]["perplexity"] - fp
        for q in (by[qat_name(g, steps, g in qat_runs)], by[f"int4 gptq+qat g{g} (--train-quantized)"]):
            ref = by[q["float_reference"]]["perplexity"]
            q["qat_over_gptq_gap"] = (q["perplexity"] - ref) / gptq_gap if gptq_gap > 0 else None
    return {"checkpoint": str(ckpt), "data": str(data), "qat_steps": steps, "eval_windows": windows,
            "qat_runs": {g: str(p) for g, p in qat_runs.items()},
            "load_average": load, "torch_threads": torch.get_num_threads(), "rows": rows}


def qat_name(group: int, steps: int, pretrained: bool) -> str:
    return f"int4 qat g{group} ({'end of pretraining' if pretrained else f'{steps} steps'})"


def markdown(result: dict) -> str:
    lines = ["| model | val perplexity (llama.cpp, GGUF) | gap to its float model | QAT gap / GPTQ gap | "
             "PyTorch perplexity |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratio = r.get("qat_over_gptq_gap")
        gap = "" if r["scheme"] == r["float_reference"] else f"{r['gap_pct']:+.2f}% (vs {r['float_reference']})"
        lines.append(f"| {r['scheme']} | {r['perplexity']:.4f} | {gap} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {r['torch_perplexity']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="float checkpoint")
    ap.add_argument("--data", type=Path, required=True, help="the prepared data it was trained on")
    ap.add_argument("--out", type=Path, required=True, help="work folder (checkpoints, GGUFs, table.md, table.json)")
    ap.add_argument("--steps", type=int, default=300, help="QAT (and control) fine-tuning steps")
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--windows", type=int, default=64, help="validation windows scored per model (0: all)")
    ap.add_argument("--qat-run", action="append", default=[], metavar="G=RUN",
                    help="group G's QAT model from pretraining (train --qat int4-gG): no fine-tunes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qat_runs = {int(g): Path(p) for g, p in (item.split("=", 1) for item in args.qat_run)}
    result = run(args.ckpt, args.data, args.out, args.steps, args.groups, args.windows or 10 ** 9, qat_runs)
    write_text(args.out / "table.md", markdown(result))
    write_text(args.out / "table.json", json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
