"""The one runtime protocol. Every target's adapter subclasses Runtime and implements
`_prefill`, `_decode` and `reset`; tokenizing, context checks and generation are written once here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import numpy as np

from nima_edge.errors import NimaError
from nima_edge.sampling import Sampling, choose
from nima_edge.tokenizer import Tokenizer


class Runtime(ABC):
    target: str = ""
    tokenizer: Tokenizer
    context_length: int

    def __init__(self):
        self.position = 0  # tokens held in the KV cache

    # --- what each adapter implements -------------------------------------------------------
    @abstractmethod
    def _prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` at self.position; return float32 logits [vocab] of the last one."""

    @abstractmethod
    def _decode(self, token_id: int) -> np.ndarray:
        """Append one token at self.position; return float32 logits [vocab]."""

    @abstractmethod
    def _reset(self) -> None:
        """Forget the cached sequence."""

    def close(self) -> None:
        """Release native resources (optional)."""

    # --- the shared surface -----------------------------------------------------------------
    def reset(self) -> None:
        self._reset()
        self.position = 0

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        if not ids:
            raise NimaError("empty prompt", "pass at least one token (the BOS token counts)")
        if self.position + len(ids) > self.context_length:
            raise NimaError(
                f"prompt of {len(ids)} tokens (after {self.position} cached) exceeds the context of "
                f"{self.context_length} tokens", "shorten the prompt or reset the conversation")
        logits = self._prefill(ids)
        self.position += len(ids)
        return np.asarray(logits, dtype=np.float32).reshape(-1)

    def decode(self, token_id: int) -> np.ndarray:
        if self.position >= self.context_length:
            raise NimaError(f"the context of {self.context_length} tokens is full", "reset before decoding more")
        logits = self._decode(int(token_id))
        self.position += 1
        return np.asarray(logits, dtype=np.float32).reshape(-1)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling | None = None,
                     stop_at_eos: bool = True) -> Iterator[int]:
        """Reset, prefill, then yield up to `max_new_tokens` ids; stops early at an end-of-reply id (eos_ids) or a
        full context."""
        sampling = sampling or Sampling()
        rng = sampling.rng()
        self.reset()
        logits = self.prefill(prompt_ids)
        max_new_tokens = min(max_new_tokens, self.context_length - self.position)  # prompt + output fit
        for i in range(max_new_tokens):
            tok = choose(logits, sampling, rng)
            if stop_at_eos and tok in self.tokenizer.eos_ids:
                return
            yield tok
            if i + 1 == max_new_tokens:
                return
            logits = self.decode(tok)

    def generate(self, prompt: str, max_new_tokens: int = 50, sampling: Sampling | None = None) -> Iterator[str]:
        """Stream text pieces of the continuation of `prompt` (BOS is prepended)."""
        stream = self.tokenizer.stream()
        for tok in self.generate_ids(self.tokenize(prompt), max_new_tokens, sampling):
            if piece := stream.step(tok):
                yield piece

    def logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """log p(ids[t] | ids[:t]) for t >= 1, decoding one token at a time (for perplexity on any target)."""
        self.reset()
        logits = self.prefill(ids[:1])
        out = []
        for t in range(1, len(ids)):
            z = logits.astype(np.float64)
            out.append(z[ids[t]] - z.max() - np.log(np.exp(z - z.max()).sum()))
            if t + 1 < len(ids):
                logits = self.decode(ids[t])
        return np.asarray(out)
