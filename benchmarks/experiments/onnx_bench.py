"""Latency of the ONNX targets next to onnxruntime-genai's own builder output from the same checkpoint.

ms for 50 generated tokens after a 16-token prompt (prefill + 49 decodes, greedy), median and p90 over
--runs runs after one warm-up, at --threads intra-op threads; artifacts are timed round-robin so that
other load on the machine affects every row alike. Weights are random-init presets: speed does
not depend on training, so no trained checkpoint is needed.

    python -m nima_edge.benchmarks.onnx_bench --presets nima-1m nima-10m --threads 2 --runs 7
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nima_edge import checkpoint
from nima_edge.config import preset
from nima_edge.export import export
from nima_edge.model import NimaForCausalLM
from nima_edge.runtimes import load_runtime
from nima_edge.tokenizer import train_tokenizer

PROMPT_TOKENS, NEW_TOKENS = 16, 50
# (label, target, quant, export options); "builder" rows are onnxruntime-genai's builder run directly
CASES = [("onnx f32", "onnx", "f32", {}), ("onnx int8", "onnx", "int8", {}), ("onnx int4", "onnx", "int4", {}),
         ("onnx int4 exact (acc 1)", "onnx", "int4", {"accuracy_level": 1}),
         ("builder fp32", "builder", "fp32", {}), ("builder int8", "builder", "int8", {}),
         ("builder int4", "builder", "int4", {}),
         ("onnx-portable f32", "onnx-portable", "f32", {}), ("onnx-portable int8", "onnx-portable", "int8", {}),
         ("onnx-portable int4", "onnx-portable", "int4", {})]


def random_checkpoint(name: str, out: Path) -> Path:
    torch.manual_seed(0)
    tok = train_tokenizer("char")
    return checkpoint.save(out, NimaForCausalLM(preset(name, tok.vocab_size)), tok)


def builder_output(ckpt: Path, out: Path, precision: str) -> Path:
    """onnxruntime-genai's builder with its CPU defaults (block 32, accuracy_level 4, symmetric)."""
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", cache], check=True, capture_output=True)
    return out


def time_rounds(artifacts: dict[str, tuple[Path, str]], threads: int, runs: int) -> dict[str, list[float]]:
    """Round-robin: each round times every artifact once, so load from other processes hits all alike."""
    runtimes = {label: load_runtime(path, target=target, threads=threads) for label, (path, target) in artifacts.items()}
    times = {label: [] for label in runtimes}
    for i in range(runs + 1):
        for label, rt in runtimes.items():
            prompt = rt.tokenize("To be, or not to")[:PROMPT_TOKENS]
            t0 = time.perf_counter()
            n = len(list(rt.generate_ids(prompt, NEW_TOKENS, stop_at_eos=False)))
            if i:  # round 0 is the warm-up
                times[label].append((time.perf_counter() - t0) * 1e3)
            assert len(prompt) == PROMPT_TOKENS and n == NEW_TOKENS
    for rt in runtimes.values():
        rt.close()
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["nima-1m", "nima-10m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--work", type=Path, default=None, help="where to keep the artifacts (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    results = {}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("exporting", total=len(args.presets) * len(CASES))
        for name in args.presets:
            ckpt = random_checkpoint(name, work / name / "ckpt")
            artifacts = {}
            for label, target, quant, options in CASES:
                progress.update(task, description=f"{name}: exporting {label}")
                out = work / name / label.replace(" ", "_").replace("(", "").replace(")", "")
                if target == "builder":
                    artifacts[label] = (builder_output(ckpt, out, quant), "onnx")
                else:
                    path = out.with_suffix(".onnx") if target == "onnx-portable" else out
                    artifacts[label] = (export(ckpt, target, path, quant, **options), target)
                progress.advance(task)
            progress.update(task, description=f"{name}: timing")
            for label, t in time_rounds(artifacts, args.threads, args.runs).items():
                results[f"{name} | {label}"] = {"median_ms": float(np.median(t)),
                                                "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
    table = Table(title=f"{NEW_TOKENS} tokens after a {PROMPT_TOKENS}-token prompt, {args.threads} threads")
    for col in ("model | artifact", "median ms", "p90 ms"):
        table.add_column(col)
    for key, r in results.items():
        table.add_row(key, f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
