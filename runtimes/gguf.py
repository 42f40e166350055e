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

from nima_edge.cpu import has_amx
from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.runtimes.gguf_format import TOKENIZER_JSON_KEY, TOKENIZER_SETTINGS_KEY
from nima_edge.tokenizer import Tokenizer

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}
# llama.cpp's own tools (llama-cli, llama-server, llama-bench) default to flash attention "auto", which is
# on for the CPU; llama-cpp-python's Llama defaults to off. On: the CPU kernel skips the cache cells a
# token cannot see, where the plain path multiplies over the whole (256-cell padded) cache. Only with
# the F16 cache of quantized files: the kernel rounds through F16, which moved an all-F32 file's logits
# by up to 7e-3 (verify's float class allows 1e-4), so the exact file keeps the plain path.
FLASH_ATTN = True


def default_threads() -> int:
    """One thread per free core, at most 4: llama.cpp's threads spin at every barrier, so using every
    core collapses when one of them is busy, and small models gain nothing past a few threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 1))


@contextlib.contextmanager
def safe_buffer_types() -> Iterator[None]:
    """Load models with llama.cpp's extra CPU buffer types off (`use_extra_bufts=False`) on CPUs with AMX.

    Quantized models segfault in the AMX/repack buffer types on some AMX Xeons. Elsewhere those buffers
    are what makes Q4_0/Q8_0 fast (weights repacked for the CPU's GEMV kernels, as llama-bench does by
    default), so they stay on: detected from the CPU's flags (nima_edge/cpu.py), not assumed.
    llama-cpp-python's Llama (which its server also uses) does not expose the flag, but builds its
    model params from llama_model_default_params() at load time, so that function is wrapped for the
    duration of a load.
    """
    if not has_amx():
        yield
        return
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
            with safe_buffer_types():
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=self.context_length, n_batch=self.context_length,
                    n_ubatch=self.context_length, n_threads=self.threads, n_threads_batch=self.threads,
                    type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
                    flash_attn=FLASH_ATTN and kv_type == "f16", verbose=False,
                    lora_path=str(lora) if lora is not None else None)
        except ValueError as e:
            raise NimaError(f"llama.cpp could not load {path}: {e}",
                            "re-export it with nima-edge export --target gguf") from e
        # One batch, reused: each call writes its tokens and asks for the last position's logits only,
        # and llama_decode runs straight on it (Llama.eval would copy every position's logits per call).
        self._batch = llama_cpp.llama_batch_init(self.context_length, 0, 1)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))

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
        batch, n = self._batch, len(ids)
        batch.n_tokens = n
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, self.position + i, 1, False
            batch.seq_id[i][0] = 0
        batch.logits[n - 1] = True
        if (rc := llama_cpp.llama_decode(self.llm.ctx, batch)) != 0:
            raise NimaError(f"llama.cpp failed to decode (llama_decode returned {rc})",
                            "reset the conversation; if it persists, re-export the model")
        # a view of llama.cpp's output buffer, copied: the next decode overwrites it
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, n - 1), shape=(self._n_vocab,)).copy()

    def _decode(self, token_id: int) -> np.ndarray:
        return self._prefill([token_id])

    def _reset(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()
