"""ExecuTorch latency: ms for 50 generated tokens after a 16-token prompt, per preset and quant scheme.

    python -m nima_edge.benchmarks.executorch_bench [--presets nima-1m nima-10m] [--quants fp32 8da4w 8da8w]
                                                     [--threads 2] [--runs 10] [--json FILE]

Weights are random-initialised (the timing does not depend on their values), char tokenizer. Each
artifact is exported to a temporary directory, then timed two ways after one warm-up:
  adapter: nima-edge's ExecuTorch runtime (executorch.runtime, one Python call per token)
  runner:  ExecuTorch's stock C++ TextLLMRunner (what the Android app and pi_demo.py use)
Reported: median and p90 of prefill(16) + 50 greedy tokens, and the .pte size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

PROMPT_TOKENS = 16
NEW_TOKENS = 50
BUDGET_MS = 100.0


def random_checkpoint(preset_name: str, out: Path) -> Path:
    from nima_edge import checkpoint
    from nima_edge.config import preset
    from nima_edge.model import NimaForCausalLM
    from nima_edge.tokenizer import CHAR_VOCAB_SIZE, train_tokenizer
    torch.manual_seed(0)
    model = NimaForCausalLM(preset(preset_name, CHAR_VOCAB_SIZE))
    return checkpoint.save(out, model, train_tokenizer("char"))


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]


def time_adapter(artifact: Path, threads: int, runs: int) -> list[float]:
    from nima_edge.runtimes.executorch import ExecuTorchRuntime
    rt = ExecuTorchRuntime(artifact, threads=threads)
    prompt = [rt.tokenizer.bos_id] + list(range(10, 10 + PROMPT_TOKENS - 1))
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        n = sum(1 for _ in rt.generate_ids(prompt, NEW_TOKENS, stop_at_eos=False))
        if i:  # run 0 is the warm-up
            times.append((time.perf_counter() - start) * 1000)
        assert n == NEW_TOKENS
    return times


def time_runner(artifact: Path, runs: int) -> list[float]:
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    runner = TextLLMRunner(str(artifact / "model.pte"), str(artifact / "tokenizer.json"))
    prompt = "x" * (PROMPT_TOKENS - 1)  # char tokenizer: 15 bytes + BOS = 16 tokens
    config = GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS, temperature=0.0, num_bos=1, warming=True)
    times, stats = [], []
    for i in range(runs + 1):
        runner.reset()
        start = time.perf_counter()
        runner.generate(prompt, config, stats_callback=stats.append)
        if i:
            times.append((time.perf_counter() - start) * 1000)
        # the runner counts the prefill's token apart; it stops early only at EOS (no ignore_eos binding)
        if stats[-1].num_generated_tokens + 1 != NEW_TOKENS or stats[-1].num_prompt_tokens != PROMPT_TOKENS:
            raise RuntimeError(f"runner generated {stats[-1].num_generated_tokens + 1} tokens after "
                               f"{stats[-1].num_prompt_tokens}, not {NEW_TOKENS} after {PROMPT_TOKENS}")
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["nima-1m", "nima-10m"])
    p.add_argument("--quants", nargs="+", default=["fp32", "8da4w", "8da8w"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)

    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from nima_edge.export import export
    _unsafe_reset_threadpool(args.threads)  # XNNPACK's pool serves both the adapter and the runner
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        task = progress.add_task("export + time", total=len(args.presets) * len(args.quants))
        for name in args.presets:
            ckpt = random_checkpoint(name, Path(tmp) / name)
            for quant in args.quants:
                progress.update(task, description=f"{name} {quant}: export")
                artifact = export(ckpt, "executorch", Path(tmp) / f"{name}-{quant}", quant, log=lambda *_: None)
                progress.update(task, description=f"{name} {quant}: timing")
                a_med, a_p90 = percentiles(time_adapter(artifact, args.threads, args.runs))
                r_med, r_p90 = percentiles(time_runner(artifact, args.runs))
                rows.append({"preset": name, "quant": quant, "threads": args.threads,
                             "pte_bytes": (artifact / "model.pte").stat().st_size,
                             "adapter_median_ms": a_med, "adapter_p90_ms": a_p90,
                             "runner_median_ms": r_med, "runner_p90_ms": r_p90})
                progress.console.print(json.dumps(rows[-1]))  # each row as it lands: exports are slow
                progress.advance(task)
    table = Table(title=f"ExecuTorch/XNNPACK: {PROMPT_TOKENS}-token prompt + {NEW_TOKENS} tokens, "
                        f"{args.threads} threads (budget {BUDGET_MS:.0f} ms)")
    for col in ("preset", "quant", ".pte KiB", "adapter median/p90 ms", "runner median/p90 ms", "budget"):
        table.add_column(col)
    for r in rows:
        best = min(r["adapter_median_ms"], r["runner_median_ms"])
        table.add_row(r["preset"], r["quant"], f"{r['pte_bytes'] / 1024:.0f}",
                      f"{r['adapter_median_ms']:.1f} / {r['adapter_p90_ms']:.1f}",
                      f"{r['runner_median_ms']:.1f} / {r['runner_p90_ms']:.1f}",
                      "met" if best < BUDGET_MS else "missed")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
