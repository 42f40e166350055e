"""Model configuration and the named presets.

Field names follow Hugging Face's LlamaConfig so `config.json` is readable by transformers,
llama.cpp's converter and ONNX Runtime GenAI's builder without translation.
"""
from __future__ import annotations

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise NimaError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
                "pick a head count that divides the width",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise NimaError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}",
                "grouped-query attention needs whole groups",
            )
        if self.head_dim % 2:
            raise NimaError(f"head_dim {self.head_dim} is odd", "RoPE rotates pairs; use an even head_dim")
        return self

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
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
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
        if d.get("model_type", "llama") != "llama":
            raise NimaError(
                f"config.json has model_type {d.get('model_type')!r}; nima-edge handles only the llama family",
                "export a LlamaForCausalLM checkpoint",
            )
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if d.get("head_dim") not in (None, cfg.head_dim):
            raise NimaError(f"config.json head_dim {d['head_dim']} != hidden_size/num_attention_heads",
                            "nima models use head_dim = hidden_size / num_attention_heads")
        return cfg.validate()

    def to_dict(self) -> dict:
        return asdict(self)


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
