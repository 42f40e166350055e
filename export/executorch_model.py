"""The export-time module for ExecuTorch: the model's own forward with ExecuTorch's LLM custom ops swapped in.

As ExecuTorch's own Llama export does it (examples/models/llama source_transformation: CustomKVCache +
SDPACustom), nothing of the forward pass is re-written here: the model's two seams get
- a static KV cache in mutable buffers, [1, max_context, kv_heads, head_dim], written by llama::update_cache;
- llama::custom_sdpa as the attention kernel (causal from the start position; grouped-query heads inside
  the op, no repeat_kv copy).
The `.pte` then has the interface the stock LLM runner drives: `forward(tokens[1, T], input_pos[1]) ->
logits[1, vocab]` of the last position. The checkpoint's submodules are used as they are, so weights are
shared, not copied, and torchao quantization of them shows up in the export unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nima_edge.model import NimaForCausalLM


def load_custom_ops() -> None:
    """Register torch.ops.llama.{update_cache, custom_sdpa} (AOT and runtime kernels live in one library)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def _start(input_pos: torch.Tensor, seq_len: int, max_context: int) -> int:
    # Unbacked symint: the checks tell torch.export it is a valid, in-range cache offset.
    start = input_pos[0].item()
    torch._check(start >= 0)
    torch._check(start + seq_len <= max_context)
    return start


class CustomKVCache(nn.Module):
    """The KV-cache seam: llama::update_cache into [1, max_context, kv_heads, head_dim] buffers (the custom
    ops' layout); returns the whole buffers in the model's [B, heads, S, D] view."""

    def __init__(self, kv_heads: int, head_dim: int, max_context: int):
        super().__init__()
        shape = (1, max_context, kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.ops.llama.update_cache(k.transpose(1, 2), self.k_cache, start)
        torch.ops.llama.update_cache(v.transpose(1, 2), self.v_cache, start)
        return self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)


class CustomSDPA(nn.Module):
    """The attention-kernel seam: llama::custom_sdpa over the cache buffers, causal from `start`."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.width = n_heads * head_dim

    def forward(self, q, k, v, mask, start) -> torch.Tensor:
        B, _, T, _ = q.shape
        y = torch.ops.llama.custom_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start, None, 0, True)
        return y.reshape(B, T, self.width)


class ExecuTorchLlama(nn.Module):
    """forward(tokens [1, T] int64, input_pos [1] int64) -> float32 logits [1, vocab] of the last token.

    Swaps the attention kernel of `model` in place (the model is the export's own copy)."""

    def __init__(self, model: NimaForCausalLM, max_context: int | None = None):
        super().__init__()
        cfg = model.config
        self.max_context = max_context or cfg.max_position_embeddings
        self.m = model.replace_sdpa(lambda attn: CustomSDPA(attn.n_heads, attn.hd))
        self.caches = nn.ModuleList(CustomKVCache(cfg.num_key_value_heads, cfg.head_dim, self.max_context)
                                    for _ in range(cfg.num_hidden_layers))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        start = _start(input_pos, T, self.max_context)
        positions = (input_pos + torch.arange(T, device=tokens.device))[None]
        h = self.m.hidden_states(tokens, positions, None, self.caches, start)
        return self.m.lm_head(h[:, -1, :])

    @torch.no_grad()
    def reset_cache(self) -> None:
        for cache in self.caches:
            cache.k_cache.zero_()
            cache.v_cache.zero_()
