"""The export-time module for ExecuTorch: our weights, a static KV cache and ExecuTorch's LLM custom ops.

It mirrors ExecuTorch's own Llama export (examples/models/llama: CustomKVCache + SDPACustom) so the
`.pte` has the interface the stock LLM runner drives: `forward(tokens[1, T], input_pos[1]) ->
logits[1, vocab]` of the last position, with the KV cache held in mutable buffers. The submodules
(projections, norms, MLPs, embeddings) are the checkpoint's own, so weights are shared, not copied,
and torchao quantization of them shows up in the export unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nima_edge.model import NimaForCausalLM, apply_rope


def load_custom_ops() -> None:
    """Register torch.ops.llama.{update_cache, custom_sdpa} (AOT and runtime kernels live in one library)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def _start(input_pos: torch.Tensor, seq_len: int, max_context: int) -> int:
    # Unbacked symint: the checks tell torch.export it is a valid, in-range cache offset.
    start = input_pos[0].item()
    torch._check(start >= 0)
    torch._check(start + seq_len <= max_context)
    return start


class CachedAttention(nn.Module):
    """Attention over a static [1, max_context, kv_heads, head_dim] cache (the custom ops' layout)."""

    def __init__(self, attn: nn.Module, max_context: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.n_heads, self.n_kv, self.hd = attn.n_heads, attn.n_kv, attn.hd
        self.max_context = max_context
        shape = (1, max_context, self.n_kv, self.hd)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, heads, hd]: the custom ops take the sequence on dim 1; RoPE broadcasts over heads.
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        # Causal from `start`; grouped-query heads are handled inside the op (no repeat_kv copy).
        y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0, True)
        return self.o_proj(y.view(B, T, self.n_heads * self.hd))


class CachedLayer(nn.Module):
    def __init__(self, layer: nn.Module, max_context: int):
        super().__init__()
        self.self_attn = CachedAttention(layer.self_attn, max_context)
        self.mlp = layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm

    def forward(self, x, cos, sin, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExecuTorchLlama(nn.Module):
    """forward(tokens [1, T] int64, input_pos [1] int64) -> float32 logits [1, vocab] of the last token."""

    def __init__(self, model: NimaForCausalLM, max_context: int | None = None):
        super().__init__()
        cfg = model.config
        self.max_context = max_context or cfg.max_position_embeddings
        self.embed_tokens, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
        self.layers = nn.ModuleList(CachedLayer(layer, self.max_context) for layer in model.model.layers)
        # [positions, 1, hd]: broadcast over the heads dim of the [B, T, heads, hd] layout.
        self.register_buffer("rope_cos", model.rope_cos[:self.max_context, None, :].clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin[:self.max_context, None, :].clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        start = _start(input_pos, T, self.max_context)
        cos, sin = self.rope_cos.narrow(0, start, T), self.rope_sin.narrow(0, start, T)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        return self.lm_head(self.norm(x[:, -1, :]))

    @torch.no_grad()
    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()
