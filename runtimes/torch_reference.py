"""The PyTorch reference runtime: what every other target is verified against."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nima_edge.checkpoint import load_model
from nima_edge.model import KVCache, NimaForCausalLM
from nima_edge.runtime import Runtime
from nima_edge.tokenizer import Tokenizer


class TorchRuntime(Runtime):
    target = "torch"

    def __init__(self, ckpt: str | Path | None = None, threads: int | None = None,
                 model: NimaForCausalLM | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        if threads:
            torch.set_num_threads(threads)
        if model is None:  # a quantized checkpoint runs as its fake-quant model: the reference for artifacts
            model, tokenizer, _ = load_model(ckpt)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.context_length = model.config.max_position_embeddings
        self.cache = KVCache(model.config)

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int]) -> np.ndarray:
        x = torch.tensor([list(ids)], dtype=torch.long)
        return self.model(x, cache=self.cache, start_pos=self.position)[0, -1].float().numpy()

    def _prefill(self, ids):
        return self._forward(ids)

    def _decode(self, token_id):
        return self._forward([token_id])

    def _reset(self):
        pass  # positions past self.position are masked out, so stale cache entries are never read
