#!/usr/bin/env python3
"""Run a nima model on a Raspberry Pi (or any Linux box) and hold it to the latency budget.

Self-contained on purpose: a board needs only the runtime wheel, not nima-edge.
    ExecuTorch:  pip install executorch            (the export directory: model.pte + tokenizer.json)
    llama.cpp:   pip install llama-cpp-python      (a .gguf from `nima-edge export --target gguf`)

    python3 pi_demo.py MODEL [--prompt TEXT] [--tokens 50] [--threads 4] [--runs 5] [--budget-ms 100]

Prints the continuation, then the median / p90 time of prefill + N greedy tokens over --runs timed
runs (one warm-up run excluded) and whether it meets the budget (50 tokens in under 100 ms).
Exit code: 0 when it ran (budget met or not), 2 on unusable input.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BOS = "<|bos|>"  # nima tokenizers: id 0; every training window starts with it


class ExecuTorchBackend:
    """The stock ExecuTorch LLM runner (TextLLMRunner): the same C++ runner the Android app uses."""

    name = "executorch"

    def __init__(self, model_dir: Path, threads: int):
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama:: kernels)
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)
        self._config = GenerationConfig
        self.runner = TextLLMRunner(str(model_dir / "model.pte"), str(model_dir / "tokenizer.json"))

    def generate(self, prompt: str, tokens: int) -> tuple[str, int, float]:
        pieces, stats = [], []
        # num_bos=1: the runner's tokenizer does not apply tokenizer.json's BOS template by itself.
        # warming=True keeps the runner from printing tokens and its report to stdout (we print).
        config = self._config(echo=False, max_new_tokens=tokens, temperature=0.0, num_bos=1, warming=True)
        self.runner.reset()
        start = time.perf_counter()
        self.runner.generate(prompt, config, token_callback=pieces.append, stats_callback=stats.append)
        elapsed = time.perf_counter() - start
        # the runner reports one token fewer than it emits (the first comes from prefill)
        return "".join(pieces), stats[0].num_generated_tokens + 1, elapsed


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python (also the Termux path on a phone)."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(self, prompt: str, tokens: int) -> tuple[str, int, float]:
        ids = self.llm.tokenize(prompt.encode(), add_bos=True, special=False)  # the GGUF says add BOS
        out = []
        start = time.perf_counter()
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if tok == self.llm.token_eos() or len(out) == tokens:
                break
            out.append(tok)
        elapsed = time.perf_counter() - start
        return self.llm.detokenize(out).decode("utf-8", errors="replace"), len(out), elapsed


def open_backend(model: Path, threads: int):
    if model.is_dir() and (model / "model.pte").is_file():
        return ExecuTorchBackend(model, threads)
    if model.suffix == ".pte" and model.is_file():
        return ExecuTorchBackend(model.parent, threads)
    if model.suffix == ".gguf" and model.is_file():
        return LlamaCppBackend(model, threads)
    sys.exit(f"error: {model} is neither an ExecuTorch export directory (model.pte + tokenizer.json) nor a .gguf\n"
             "  fix: nima-edge export CKPT --target executorch --out DIR  (or --target gguf --out model.gguf)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="ExecuTorch export directory (or its model.pte), or a .gguf")
    p.add_argument("--prompt", default="ROMEO:\nBut soft, what light through yonder window")
    p.add_argument("--tokens", type=int, default=50, help="tokens to generate per run")
    p.add_argument("--threads", type=int, default=4, help="CPU threads (a Pi 4/5 has 4 cores)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--budget-ms", type=float, default=100.0, help="latency budget for --tokens tokens")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.runs < 1:
        sys.exit("error: --tokens and --runs must be at least 1")
    if not args.model.exists():
        sys.exit(f"error: {args.model} does not exist\n  fix: copy the exported model to the board first")

    backend = open_backend(args.model, args.threads)
    text, n, _ = backend.generate(args.prompt, args.tokens)  # warm-up (page-in, thread spin-up)
    print(f"{args.prompt}{text}\n", flush=True)
    times = []
    for _ in range(args.runs):
        _, n, elapsed = backend.generate(args.prompt, args.tokens)
        times.append(elapsed * 1000)
    times.sort()
    median = statistics.median(times)
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    # scale to the budget's token count so an early EOS does not flatter the figure
    per_budget = median * args.tokens / max(n, 1)
    ok = per_budget < args.budget_ms
    print(f"backend {backend.name}, {args.threads} threads: {n} tokens in {median:.1f} ms median "
          f"(p90 {p90:.1f} ms), {1000 * n / median:.0f} tokens/s")
    print(f"budget: {args.tokens} tokens < {args.budget_ms:.0f} ms -> {'MET' if ok else 'MISSED'} "
          f"({per_budget:.1f} ms)")
    if args.json:
        print(json.dumps({"backend": backend.name, "threads": args.threads, "tokens": n, "median_ms": median,
                          "p90_ms": p90, "tokens_per_s": 1000 * n / median, "budget_ms": args.budget_ms,
                          "budget_met": ok}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
