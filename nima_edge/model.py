"""The one model family: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA, optional tied embeddings).

Module and parameter names are exactly Hugging Face's LlamaForCausalLM ones, so a state dict
saved from here loads into transformers unchanged and the other way round. RoPE uses HF's
rotate_half layout (first half / second half of each head), not the interleaved one.

There is one forward pass, with two seams that exporters swap instead of re-writing it (the pattern
of gpt-fast's KVCache and ExecuTorch's source transforms):
- the KV cache: any per-layer object with `update(input_pos, k, v) -> (keys, values)` passed as
  `cache` (eager: KVCache here; ONNX: past/present graph I/O; ExecuTorch: llama::update_cache buffers);
- the attention kernel: each Attention's `sdpa` module, `forward(q, k, v, mask, input_pos) -> [B, T, H*D]`
  (eager: torch SDPA; ONNX: a masked matmul-softmax; ExecuTorch: llama::custom_sdpa).
q/k/v reach both seams as [batch, heads, tokens, head_dim].
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nima_edge.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2], with the config's scaling (HF's rope init functions)."""
    return scaled_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def rope_factors(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """How much the scaling slows each frequency (1 = unchanged): llama.cpp's `rope_freqs` tensor, which
    the GGUF exporter writes and the GGUF importer reads back into a rope_scaling."""
    return scaled_inv_freq(head_dim, theta, None) / scaled_inv_freq(head_dim, theta, scaling)


def scaled_inv_freq(hd: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for the given positions, computed on the fly as HF does: no [context, head_dim] tables,
    whatever max_position_embeddings says."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, head_dim] (broadcast over the heads of [B, T, H, D])."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * rep, S, D] with HF's repeat_kv head grouping."""
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def causal_mask(start_pos: int, length: int, device=None) -> torch.Tensor:
    """[length, start_pos + length] bool: query i (at position start_pos + i) sees every slot up to its own."""
    end = start_pos + length
    return torch.arange(end, device=device)[None, :] <= torch.arange(start_pos, end, device=device)[:, None]


class LayerKVCache:
    """Keys/values of one attention layer, [batch, kv_heads, capacity, head_dim], written in place at
    `start_pos` and read back up to the last written slot. Capacity grows on demand up to max_len, so
    a model declared for 128K positions costs memory only for the positions actually used."""

    GROW = 256  # slots added at least at a time

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype=torch.float32, device=None):
        self.shape, self.max_len, self.dtype, self.device = (batch, kv_heads, head_dim), max_len, dtype, device
        self.k = self.v = None

    def _reserve(self, end: int) -> None:
        have = 0 if self.k is None else self.k.shape[2]
        if end <= have:
            return
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        size = min(self.max_len, max(end, 2 * have, self.GROW))
        batch, heads, hd = self.shape
        k, v = (torch.zeros(batch, heads, size, hd, dtype=self.dtype, device=self.device) for _ in range(2))
        if have:
            k[:, :, :have], v[:, :, :have] = self.k, self.v
        self.k, self.v = k, v

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, end = k.shape[0], start_pos + k.shape[2]
        self._reserve(end)
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


class KVCache:
    """The eager KV cache of a whole model: one LayerKVCache per decoder layer, for up to max_len positions
    (default: the model's declared context; memory grows only with the positions used)."""

    def __init__(self, cfg: ModelConfig, batch: int = 1, max_len: int | None = None, dtype=torch.float32, device=None):
        self.max_len = max_len or cfg.max_position_embeddings
        self.layers = [LayerKVCache(batch, cfg.num_key_value_heads, cfg.head_dim, self.max_len, dtype, device)
                       for _ in range(cfg.num_hidden_layers)]

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)


class SDPA(nn.Module):
    """The attention kernel seam: torch's scaled_dot_product_attention over grouped-query heads.
    mask: bool [.., T, S] (True = may attend) or None for causal attention over equal lengths."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.dropout = n_heads, n_kv, head_dim, dropout

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, H * D]"""
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    def forward(self, q, k, v, mask: torch.Tensor | None, input_pos=None) -> torch.Tensor:
        rep = self.n_heads // self.n_kv
        y = F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask,
                                           is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.merge_heads(y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=bias)
        self.sdpa = SDPA(self.n_heads, self.n_kv, self.hd, cfg.dropout)

    def forward(self, x, rope, mask=None, cache=None, input_pos=0):
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
        return self.o_proj(self.sdpa(q, k, v, mask, input_pos))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask=None, cache=None, input_pos=0):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache, input_pos))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class NimaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once

    # --- the one forward pass, in the pieces exporters and GPTQ use ---------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, hidden] through decoder layer `index`, positions 0..T-1, causal, no cache
        (what GPTQ walks layer by layer)."""
        positions = torch.arange(x.shape[1], device=x.device)[None]
        return self.model.layers[index](x, self.model.rotary_emb(positions))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                      cache: Sequence | None = None, input_pos=0) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] of tokens at `positions` [B or 1, T].

        mask: bool, broadcastable to [B, heads, T, S] over the S keys the cache returns (None: causal, no
        past); cache: one object per layer with update(input_pos, k, v) (None: no past); input_pos: what
        the cache and the attention kernel take as the write position.
        """
        x = self.embed(input_ids)
        rope = self.model.rotary_emb(positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, mask, None if cache is None else cache[i], input_pos)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0):
        """Logits [B, T, vocab]; with `targets`, also the mean cross-entropy (ignore_index -100)."""
        T = input_ids.shape[1]
        if start_pos + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the context of "
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)[None]
        mask = None if cache is None else causal_mask(start_pos, T, input_ids.device)
        logits = self.lm_head(self.hidden_states(input_ids, positions, mask, cache, start_pos))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def replace_sdpa(self, make: Callable[[Attention], nn.Module]) -> "NimaForCausalLM":
        """Swap every layer's attention kernel for make(attention) (a source transform; in place)."""
        for layer in self.model.layers:
            layer.self_attn.sdpa = make(layer.self_attn)
        return self
