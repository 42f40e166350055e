#!/usr/bin/env python3
"""Run a nima model on a Raspberry Pi (or any Linux box), check it is the verified model, time it.

Self-contained on purpose: a board needs only the runtime package (plus `tokenizers` for ONNX), never
torch or nima-edge for llama.cpp and ONNX Runtime (pip lines: android_demo/README.md):
    llama.cpp:      a .gguf from `nima-edge export --target gguf`              (llama-cpp-python)
    ONNX Runtime:   a .onnx from `nima-edge export --target onnx-portable`      (onnxruntime, tokenizers)
    ExecuTorch:     the folder from `nima-edge export --target executorch`      (executorch + torch)

    python3 pi_demo.py MODEL [--prompt TEXT] [--tokens 50] [--threads 4] [--runs 5] [--budget-ms 100]

First the self-check: `nima-edge verify` records the artifact's first greedy tokens for a fixed prompt in
its manifest (NAME.manifest.json beside a file, manifest.json in a folder; copy it with the model).
The board re-derives them, fed the recorded history (teacher-forced, as verify counts greedy agreement),
and prints PASS when it agrees as often as verify's tolerance for the scheme demands (every token for
float models). Then the continuation of --prompt, and the median / p90 time of prefill + N greedy
tokens over --runs timed runs (one warm-up run excluded) against the budget (50 tokens < 100 ms).
Exit code: 0 when it ran (budget met or not), 1 when the self-check failed, 2 on unusable input.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Copies of runtimes/onnx_portable_format.py's names (tests/test_pi_demo.py holds them equal): the
# board has no nima-edge to import them from.
ONNX_META_TOKENIZER, ONNX_META_CONFIG = "nima.tokenizer", "nima.config"
ONNX_META_TOKENIZER_SETTINGS = "nima.tokenizer.settings"  # bos/eos tokens and end ids (imported models differ)
# ONNX Runtime's int8-activation MatMulNBits path: what nima-edge's runtime (and so verify) uses.
ONNX_ACCURACY_LEVEL = "4"


def unusable(message: str):
    """Bad input: the problem and its fix on stderr, exit code 2."""
    print(message, file=sys.stderr)
    sys.exit(2)


def argmax(values) -> int:
    """Index of the first largest value (numpy's tie rule), for any sequence of floats."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


class LogitsBackend:
    """Greedy decoding over a backend's `logits(ids, start)`: the self-check and ONNX's generation."""

    def logits(self, ids: list[int], start: int):
        """Append `ids` at position `start` of the cache; return the last position's logits."""
        raise NotImplementedError

    def greedy_ids(self, prompt_ids: list[int], n: int) -> list[int]:
        out, z = [], self.logits(list(prompt_ids), 0)
        for i in range(n):
            out.append(argmax(z))
            if i + 1 < n:
                z = self.logits([out[-1]], len(prompt_ids) + i)
        return out

    def forced_ids(self, prompt_ids: list[int], tokens: list[int]) -> list[int]:
        """The greedy pick at each step when fed `tokens` as the history (teacher forcing)."""
        picks, z = [], self.logits(list(prompt_ids), 0)
        for i, tok in enumerate(tokens):
            picks.append(argmax(z))
            if i + 1 < len(tokens):
                z = self.logits([tok], len(prompt_ids) + i)
        return picks


class ExecuTorchBackend(LogitsBackend):
    """The stock ExecuTorch LLM runner (TextLLMRunner, the C++ runner the Android app uses) for the
    timed generation; the program's forward method for the self-check (the runner hides logits)."""

    name = "executorch"

    def __init__(self, model_dir: Path, threads: int):
        import torch  # executorch's runner bindings link libtorch: it is preloaded first
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama:: kernels)
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)
        self._torch, self._config = torch, GenerationConfig
        pte = model_dir / "model.pte"
        self.runner = TextLLMRunner(str(pte), str(model_dir / "tokenizer.json"))
        program = Runtime.get().load_program(pte)
        self._forward = program.load_method("forward")
        self._max_seq_len = int(program.load_method("get_max_seq_len").execute([])[0])
        # Whether the model expects BOS in front: tokenizer_config.json's add_bos_token, written by the
        # exporter from the checkpoint's tokenizer (nima models: yes; many imported ones, e.g. SmolLM2: no).
        # The runner's tokenizer adds none by itself, so it is asked for num_bos of them.
        try:
            settings = json.loads((model_dir / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            settings = {}
        self._num_bos = int(bool(settings.get("add_bos_token", True)))
        self._bos_token, self._text = settings.get("bos_token"), {}
        try:
            ends = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        except (OSError, ValueError):
            ends = None
        self._eos = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
        self._tokenizer_path = model_dir / "tokenizer.json"

    def logits(self, ids, start):
        torch = self._torch
        for i in range(0, len(ids), self._max_seq_len):  # the program's largest single call
            chunk = torch.tensor([ids[i:i + self._max_seq_len]], dtype=torch.long)
            z = self._forward.execute([chunk, torch.tensor([start + i], dtype=torch.long)])[0][0].tolist()
        return z

    def generate(self, prompt: str, tokens: int) -> tuple[str, int, float]:
        stats = []
        # warming=True keeps the runner from printing tokens and its report to stdout (we print).
        config = self._config(echo=False, max_new_tokens=tokens, temperature=0.0, num_bos=self._num_bos,
                              warming=True)
        self.runner.reset()
        start = time.perf_counter()
        # No token_callback: executorch 1.5.1's binding turns each piece into a Python str and raises
        # UnicodeDecodeError on a byte-level piece that is not whole UTF-8 (half of an accented letter),
        # aborting the run. The text is decoded from the same program's greedy ids instead (text()).
        self.runner.generate(prompt, config, stats_callback=stats.append)
        elapsed = time.perf_counter() - start
        # the runner reports one token fewer than it emits (the first comes from prefill)
        return self.text(prompt, tokens), stats[0].num_generated_tokens + 1, elapsed

    def text(self, prompt: str, tokens: int) -> str:
        """The greedy continuation, decoded whole by `tokenizers` (executorch installs it through
        pytorch-tokenizers); computed once per prompt, outside the timed runner call."""
        if (prompt, tokens) not in self._text:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(self._tokenizer_path))
            bos = tok.token_to_id(self._bos_token) if self._bos_token else None
            ids = [bos] * self._num_bos if bos is not None else []
            ids += tok.encode(prompt, add_special_tokens=False).ids
            out = self.greedy_ids(ids, tokens)
            end = next((i for i, t in enumerate(out) if t in self._eos), len(out))
            self._text[(prompt, tokens)] = tok.decode(out[:end])
        return self._text[(prompt, tokens)]


class LlamaCppBackend(LogitsBackend):
    """llama.cpp through llama-cpp-python (also the Termux path on a phone)."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

        meta = Llama(model_path=str(gguf), vocab_only=True, verbose=False).metadata
        context = int(meta["llama.context_length"])
        # nima-edge's runtime keeps an all-F32 file's KV cache in F32 (exact), F16 otherwise, with flash
        # attention (llama.cpp's own default) on the F16 cache; so do we, or the self-check would compare
        # a different computation. logits_all: .scores holds them.
        kv = GGML_TYPE_F32 if meta.get("general.file_type") == "0" else GGML_TYPE_F16
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, type_k=kv, type_v=kv, flash_attn=kv == GGML_TYPE_F16,
                         verbose=False)

    def logits(self, ids, start):
        if start == 0:
            self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[self.llm.n_tokens - 1].tolist()

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


class OnnxBackend(LogitsBackend):
    """ONNX Runtime's InferenceSession on the portable .onnx (optimum's past/present KV naming); the
    tokenizer and the model's shape come from the file's metadata."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", ONNX_ACCURACY_LEVEL)
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_META_TOKENIZER not in meta:
            unusable(f"error: {path} carries no nima-edge metadata\n  fix: nima-edge export CKPT --target onnx-portable")
        self.tokenizer, cfg = Tokenizer.from_str(meta[ONNX_META_TOKENIZER]), json.loads(meta[ONNX_META_CONFIG])
        settings = json.loads(meta.get(ONNX_META_TOKENIZER_SETTINGS, "{}"))
        self.eos = set(settings.get("eos_token_ids") or [self.tokenizer.token_to_id("<|eos|>")])
        self.np = np
        self.cache_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.cache_names]
        self.empty = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), dtype=np.float32)
        self.past = []

    def logits(self, ids, start):
        np = self.np
        if start == 0:
            self.past = [self.empty] * len(self.cache_names)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
                "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
                **dict(zip(self.cache_names, self.past))}
        z, *self.past = self.session.run(self.outputs, feed)
        return z[0, -1]

    def generate(self, prompt: str, tokens: int) -> tuple[str, int, float]:
        ids = self.tokenizer.encode(prompt).ids  # tokenizer.json's template prepends BOS
        start = time.perf_counter()
        out = self.greedy_ids(ids, tokens)
        elapsed = time.perf_counter() - start
        end = next((i for i, t in enumerate(out) if t in self.eos), len(out))
        shown = out[:end]  # every token was computed and timed
        return self.tokenizer.decode(shown), len(out), elapsed


def open_backend(model: Path, threads: int):
    if model.is_dir() and (model / "model.pte").is_file():
        return ExecuTorchBackend(model, threads)
    if model.suffix == ".pte" and model.is_file():
        return ExecuTorchBackend(model.parent, threads)
    if model.suffix == ".gguf" and model.is_file():
        return LlamaCppBackend(model, threads)
    if model.suffix == ".onnx" and model.is_file():
        return OnnxBackend(model, threads)
    unusable(f"error: {model} is not an ExecuTorch export directory (model.pte + tokenizer.json), a .gguf or "
             "a portable .onnx\n  fix: nima-edge export CKPT --target executorch --out DIR  "
             "(or --target gguf --out model.gguf, --target onnx-portable --out model.onnx)")


def manifest_path(model: Path) -> Path:
    """Where nima-edge writes an artifact's manifest (nima_edge/manifest.py)."""
    if model.suffix == ".pte":
        model = model.parent
    return model / "manifest.json" if model.is_dir() else model.with_name(model.name + ".manifest.json")


def self_check(backend, model: Path) -> dict | None:
    """Compare the backend's greedy tokens with the ones verify recorded; None when nothing is recorded."""
    path = manifest_path(model)
    try:
        record = json.loads(path.read_text())["verify"]["self_check"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"self-check: skipped (no verified greedy tokens in {path.name}: copy the manifest with the "
              "model, after nima-edge verify)")
        return None
    expected, prompt_ids = record["tokens"], record["prompt_ids"]
    forced = backend.forced_ids(prompt_ids, expected)
    free = backend.greedy_ids(prompt_ids, len(expected))
    hits = sum(a == b for a, b in zip(forced, expected))
    prefix = next((i for i, (a, b) in enumerate(zip(free, expected)) if a != b), len(expected))
    agreement = hits / len(expected)
    passed = agreement >= record["min_agreement"]
    print(f"self-check: {'PASS' if passed else 'FAIL'}: {hits}/{len(expected)} of the verified greedy tokens "
          f"(needs {record['min_agreement']:.0%}, {record['quant']}); free-running, the first {prefix} match")
    return {"passed": passed, "agreement": agreement, "prefix": prefix, "tokens": free, "forced": forced,
            "expected": expected}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="ExecuTorch export directory (or its model.pte), a .gguf or a .onnx")
    p.add_argument("--prompt", default="ROMEO:\nBut soft, what light through yonder window")
    p.add_argument("--tokens", type=int, default=50, help="tokens to generate per run")
    p.add_argument("--threads", type=int, default=4, help="CPU threads (a Pi 4/5 has 4 cores)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--budget-ms", type=float, default=100.0, help="latency budget for --tokens tokens")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.runs < 1:
        unusable("error: --tokens and --runs must be at least 1")
    if not args.model.exists():
        unusable(f"error: {args.model} does not exist\n  fix: copy the exported model to the board first")

    backend = open_backend(args.model, args.threads)
    check = self_check(backend, args.model)
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
                          "budget_met": ok, "text": text, "self_check": check}))
    return 1 if check is not None and not check["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
