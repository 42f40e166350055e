"""Model configuration and the named presets.

Field names follow Hugging Face's LlamaConfig so `config.json` is readable by transformers,
llama.cpp's converter and ONNX Runtime GenAI's builder without translation. Both layouts found in
the wild are read: transformers 4 (`rope_theta`/`rope_scaling` at the top level) and transformers 5
(`rope_parameters` holding the theta and the scaling); both are written, so either version reads ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from nima_edge.errors import NimaError


@dataclass
class ModelConfig:
    vocab_size: int = 262
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    dropout: float = 0.0  # training only; not part of the HF config
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2
    head_dim: int | None = None  # None: hidden_size / num_attention_heads (HF's default)
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}; None: plain RoPE
    attention_bias: bool = False  # q/k/v/o projections carry biases
    mlp_bias: bool = False  # gate/up/down projections carry biases

    def __post_init__(self):
        h, n = self.hidden_size, self.num_attention_heads  # (types are checked in validate)
        if self.head_dim is None and type(h) is int and type(n) is int and n > 0 and h % n == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> "ModelConfig":
        self._check_types()
        if self.head_dim is None:
            raise NimaError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
                "pick a head count that divides the width, or give head_dim explicitly",
            )
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise NimaError(f"config head_dim is {self.head_dim!r}; it must be a positive whole number",
                            "fix config.json")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NimaError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}",
                "grouped-query attention needs whole groups",
            )
        if self.head_dim % 2:
            raise NimaError(f"head_dim {self.head_dim} is odd", "RoPE rotates pairs; use an even head_dim")
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        return self

    def _check_types(self) -> None:
        """Sizes are positive whole numbers and eps/theta positive finite numbers (a hand-edited
        config.json must fail here with its field named, not as a shape error deep in torch)."""
        for name in _SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise NimaError(f"config {name} is {value!r} ({type(value).__name__}); it must be a whole number",
                                "fix config.json (sizes are JSON integers)")
            if value <= 0:
                raise NimaError(f"config {name} is {value}; it must be positive", "fix config.json")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise NimaError(f"config {name} is {value!r}; it must be a positive number", "fix config.json")

    def to_hf(self) -> dict:
        """The `config.json` of a LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "dtype": "float32",
        }

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise NimaError(f"config.json holds a {type(d).__name__}, not an object of model settings",
                            "use a Hugging Face LlamaForCausalLM config.json")
        if d.get("model_type", "llama") != "llama":
            raise NimaError(
                f"config.json has model_type {d.get('model_type')!r}; nima-edge handles only the llama family",
                "export a LlamaForCausalLM checkpoint",
            )
        if d.get("hidden_act", "silu") != "silu":
            raise NimaError(f"config.json has hidden_act {d['hidden_act']!r}; Llama's MLP is SwiGLU (silu)",
                            "import a LlamaForCausalLM with hidden_act silu")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise NimaError(f"config.json rotates {d['partial_rotary_factor']} of each head; nima-edge rotates "
                            "all of it", "import a Llama model with full rotary embeddings")
        d = {**d, **rope_fields(d)}
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg._check_types()  # before anything divides by a head count
        return cfg.validate()

    def to_dict(self) -> dict:
        return asdict(self)


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_fields(d: dict) -> dict:
    """rope_theta and rope_scaling from either layout: transformers 5's `rope_parameters` (which wins when
    both are present, as in transformers 5) or transformers 4's top-level keys."""
    params = d.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return {}
    out = {"rope_scaling": None if params.get("rope_type", params.get("type", "default")) == "default" else params}
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    return out


def check_rope_scaling(scaling) -> dict | None:
    """The scaling normalised to {"rope_type", *its parameters}; llama3 and linear only, others refused."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise NimaError(f"config rope_scaling is {scaling!r}, not an object", "fix config.json")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise NimaError(f"rope_scaling of type {kind!r} is not supported",
                        f"nima-edge runs plain RoPE and the {' and '.join(ROPE_SCALING_KEYS)} scalings; "
                        "import a model that uses one of them")
    out = {"rope_type": kind}
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise NimaError(f"rope_scaling {kind} needs a positive number {key}, got {value!r}", "fix config.json")
        out[key] = value
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise NimaError("rope_scaling llama3 needs high_freq_factor > low_freq_factor", "fix config.json")
    return out


DEFAULT_CONTEXT_CAP = 2048


def check_context(cfg: ModelConfig, context: int | None) -> int:
    """The context an export sizes its KV cache for: `context` when given (1 .. max_position_embeddings),
    else the declared context capped at DEFAULT_CONTEXT_CAP, so a 128K-position model does not get a
    128K-slot cache by default."""
    if context is None:
        return min(cfg.max_position_embeddings, DEFAULT_CONTEXT_CAP)
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= cfg.max_position_embeddings:
        raise NimaError(f"context {context!r} is outside 1 .. {cfg.max_position_embeddings} (the model's "
                        "max_position_embeddings)", f"pass --context between 1 and {cfg.max_position_embeddings}")
    return context


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings")

# Widths are multiples of 128 (GGUF Q4_0/Q8_0 and ONNX int4 need 32, the block-128 DequantizeLinear
# of the portable ONNX needs 128) and, for 5m/10m, of 256 (llama.cpp K-quant super-blocks).
# Parameter counts below are for the 262-token char vocabulary with tied embeddings.
PRESETS: dict[str, dict] = {
    # 3 x 164,096 + 262 x 128 + 128 = 526,016 (the original NIMA was ~547K with a 65-char vocab and untied head)
    "nima-0.5m": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    # 5 x 196,864 + 33,536 + 128 = 1,017,984
    "nima-1m": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # 6 x 786,944 + 67,072 + 256 = 4,788,992
    "nima-5m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # 4 x 2,622,464 + 134,144 + 512 = 10,624,512
    "nima-10m": dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512),
}


def preset(name: str, vocab_size: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise NimaError(f"unknown preset {name!r}", f"choose one of: {', '.join(PRESETS)}")
    return ModelConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides}).validate()
