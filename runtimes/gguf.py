"""llama.cpp runtime (llama-cpp-python) for GGUF artifacts, behind the common Runtime protocol.

Tokenization goes through llama.cpp's own tokenizer (what a llama.cpp deployment runs), so
`verify` compares it with the checkpoint's; the checkpoint's tokenizer.json, embedded in the GGUF
by our exporter, serves streaming decode and the special ids.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterator, Sequence

import gguf
import llama_cpp
import numpy as np

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.runtimes.gguf_format import TOKENIZER_JSON_KEY, TOKENIZER_SETTINGS_KEY
from nima_edge.tokenizer import Tokenizer

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}


def default_threads() -> int:
    """One thread per free core, at most 4: llama.cpp's threads spin at every barrier, so using every
    core collapses when one of them is busy, and small models gain nothing past a few threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 1))


@contextlib.contextmanager
def no_extra_bufts() -> Iterator[None]:
    """Load models with llama.cpp's extra CPU buffer types off (`use_extra_bufts=False`).

    Quantized models segfault in the AMX/repack buffer types on some Xeons. llama-cpp-python's Llama
    (which its server also uses) does not expose the flag, but builds its model params from
    llama_model_default_params() at load time, so that function is wrapped for the duration of a load.
    """
    original = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original


def read_metadata(path: str | Path) -> dict:
    """Validate a GGUF file (magic, header, tensor data present) and return its key/values."""
    path = Path(path)
    fix = "re-export it with nima-edge export --target gguf (a partial copy or download also looks like this)"
    if not path.is_file():
        raise NimaError(f"GGUF file {path} does not exist", "check the path")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct/numpy errors on bad magic or short files
        raise NimaError(f"{path} is not a readable GGUF file (corrupt or truncated): {e}", fix) from e
    meta = {}
    for field in reader.fields.values():
        try:
            meta[field.name] = field.contents()
        except Exception as e:
            raise NimaError(f"{path}: metadata {field.name} is unreadable: {e}", fix) from e
    if meta.get("general.architecture") != "llama":
        raise NimaError(f"{path} holds a {meta.get('general.architecture')!r} model, not llama",
                        "nima-edge runs the llama family it exports")
    return meta


class LlamaCppRuntime(Runtime):
    target = "gguf"

    def __init__(self, path: str | Path, threads: int | None = None, kv_type: str | None = None,
                 context_length: int | None = None, lora: str | Path | None = None):
        """`lora`: a LoRA adapter GGUF (export --target gguf --lora) applied on top of this base model."""
        super().__init__()
        meta = read_metadata(path)
        if meta.get("general.type") == "adapter":
            raise NimaError(f"{path} is a LoRA adapter, not a model",
                            "load the base model's GGUF with it: load_runtime(BASE.gguf, lora=ADAPTER.gguf)")
        if lora is not None and read_metadata(lora).get("general.type") != "adapter":
            raise NimaError(f"{lora} is not a LoRA adapter GGUF (general.type is not 'adapter')",
                            "write one with: nima-edge export BASE --target gguf --lora RUN/adapter --out adapter.gguf")
        if TOKENIZER_JSON_KEY not in meta:
            raise NimaError(f"{path} was not written by nima-edge (no {TOKENIZER_JSON_KEY})",
                            f"bring it in first: nima-edge import {path} --out CKPT, then nima-edge export CKPT "
                            "--target gguf (verify then checks it against PyTorch)")
        # an all-F32 file is the exact one, so its cache is F32 too; llama.cpp's F16 cache otherwise
        kv_type = kv_type or ("f32" if meta.get("general.file_type") == gguf.LlamaFileType.ALL_F32 else "f16")
        if kv_type not in KV_TYPES:
            raise NimaError(f"unknown KV cache type {kv_type!r}", f"choose one of: {', '.join(KV_TYPES)}")
        self.tokenizer = Tokenizer.from_str(meta[TOKENIZER_JSON_KEY], meta.get(TOKENIZER_SETTINGS_KEY))
        self.context_length = context_length or int(meta["llama.context_length"])
        self.threads = threads or default_threads()
        try:
            with no_extra_bufts():
                # logits_all: Llama.eval stores every position's logits in .scores (exact float32 logits)
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=self.context_length, n_batch=self.context_length,
                    n_ubatch=self.context_length, n_threads=self.threads, n_threads_batch=self.threads,
                    logits_all=True, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], verbose=False,
                    lora_path=str(lora) if lora is not None else None)
        except ValueError as e:
            raise NimaError(f"llama.cpp could not load {path}: {e}",
                            "re-export it with nima-edge export --target gguf") from e

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        # special=True: "<|user|>" in text is the special token, as in the checkpoint's tokenizer
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        # llama.cpp's own llama_detokenize: Llama.detokenize strips a space after BOS (a Llama-1 SPM rule)
        ids = list(ids)
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        size = 16 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n  # too small: llama.cpp returns minus the length it needs

    def _prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.llm.eval(list(ids))
        return self.llm.scores[self.llm.n_tokens - 1].copy()

    def _decode(self, token_id: int) -> np.ndarray:
        return self._prefill([token_id])

    def _reset(self) -> None:
        self.llm.reset()  # the next eval drops cached positions past n_tokens = 0

    def close(self) -> None:
        self.llm.close()
