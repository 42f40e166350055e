"""Import a llama-architecture .gguf file (llama.cpp's format) as an ordinary float checkpoint.

Weights of any type gguf-py reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x and the K-quants) are
dequantized to float32 with gguf-py; the Q/K rows that llama.cpp's converter permuted into its
interleaved RoPE layout are put back into Hugging Face's rotate_half order; a missing `output`
tensor means tied embeddings. The tokenizer is rebuilt from the tokenizer.ggml.* keys (gguf_vocab.py)
and the chat template is carried over. A quantized GGUF imports as the float model its blocks decode to:
the quantization error stays in the weights, and nima-edge can quantize again from there.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nima_edge import checkpoint
from nima_edge.atomic import sha256_file
from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.importer.build import build_model
from nima_edge.importer.gguf_vocab import tokenizer_from_gguf
from nima_edge.model import NimaForCausalLM, rope_factors
from nima_edge.tokenizer import Tokenizer

FIX = "check the file (a partial download looks like this), or import the Hugging Face model directory instead"
# llama3 rope defaults, as in transformers and llama.cpp's converter
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read(path: Path):
    try:
        import gguf
    except ImportError as e:
        raise NimaError("reading GGUF files needs gguf-py", "pip install 'nima-edge[gguf]'") from e
    try:
        reader = gguf.GGUFReader(path)
        meta = {f.name: f.contents() for f in reader.fields.values()}
    except Exception as e:  # gguf-py raises ValueError/struct/numpy errors on bad magic or short files
        raise NimaError(f"{path} is not a readable GGUF file: {e}", FIX) from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise NimaError(f"{path} holds a {arch!r} model; nima-edge imports the llama architecture only",
                        "pick a Llama-family GGUF (SmolLM2, TinyLlama, Llama-3.2, ...)")
    return reader, meta


def float32_decimal(value: float) -> float:
    """GGUF stores eps/theta as float32: 1e-5 reads back as 9.99999974e-06; the shortest decimal that
    rounds to the same float32 is the number the config had."""
    return float(str(np.float32(value)))


def rope_scaling(meta: dict, tensors: dict, head_dim: int, theta: float, path: Path) -> dict | None:
    """The Hugging Face rope_scaling a GGUF encodes: linear from its keys, llama3 from its rope_freqs tensor
    (fitted with llama3's default thresholds and checked to reproduce the tensor)."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        factors = tensors["rope_freqs.weight"].reshape(-1)
        scaling = {"rope_type": "llama3", "factor": float32_decimal(factors.max()), **LLAMA3_DEFAULTS}
        if not np.allclose(rope_factors(head_dim, theta, scaling).numpy(), factors, rtol=1e-5, atol=1e-6):
            raise NimaError(f"{path}: its rope_freqs tensor is not a llama3 rope scaling with the usual "
                            "thresholds (low 1, high 4, original context 8192)",
                            "import the Hugging Face model directory instead (its config.json is exact)")
        return scaling
    if kind == "linear":
        return {"rope_type": "linear", "factor": float32_decimal(meta["llama.rope.scaling.factor"])}
    if kind not in ("none", ""):
        raise NimaError(f"{path} uses rope scaling {kind!r}; nima-edge supports linear and llama3",
                        "pick a model without that scaling")
    return None


def hf_config(meta: dict, tensors: dict, vocab: int, path: Path) -> dict:
    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise NimaError(f"{path} lacks llama.{name}", FIX)
        return float32_decimal(value) if isinstance(value, float) else value

    hidden, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise NimaError(f"{path}: keys and values of different widths", "not a plain Llama model")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise NimaError(f"{path} rotates only part of each head (rope.dimension_count); Llama rotates it all",
                        "not a plain Llama model")
    theta = float(key("rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv", n_head)), "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)), "rope_theta": theta,
        "rope_scaling": rope_scaling(meta, tensors, head_dim, theta, path),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }


def hf_rows_from_gguf(n_rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's Q/K permutation (interleaved RoPE pairs -> rotate_half halves)."""
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(n_rows)


def dequantized(reader) -> tuple[dict[str, np.ndarray], Counter]:
    import gguf
    out, types = {}, Counter()
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise NimaError(f"gguf-py cannot dequantize {t.name} ({t.tensor_type.name})",
                            "import a GGUF of another type (F16, Q8_0, Q4_K_M ...) or the Hugging Face model") from e
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(shape)
        types[t.tensor_type.name] += 1
    return out, types


def import_gguf(src: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    import gguf
    reader, meta = read(src)
    hf_tok, settings = tokenizer_from_gguf(meta)
    tok = Tokenizer(hf_tok, settings)
    log(f"dequantizing {len(reader.tensors)} tensors from {src}")
    tensors, types = dequantized(reader)
    if "token_embd.weight" not in tensors:
        raise NimaError(f"{src} has no token_embd tensor", FIX)
    vocab = tensors["token_embd.weight"].shape[0]
    config = hf_config(meta, tensors, vocab, src)
    eos = list(tok.eos_ids)
    config.update(bos_token_id=tok.bos_id, eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tok.pad_id)
    cfg = ModelConfig.from_hf(config)
    with torch.device("meta"):
        names = list(NimaForCausalLM(cfg).state_dict())
    to_gguf = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    weights, used = {}, {"rope_freqs.weight"}
    for name in names:
        gguf_name = to_gguf.get_name(name, try_suffixes=(".weight",))
        if gguf_name not in tensors:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise NimaError(f"{src} has no tensor {gguf_name} (for {name})", FIX)
        data = tensors[gguf_name]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = data[hf_rows_from_gguf(data.shape[0], heads)]
        weights[name] = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the reader's arrays are read-only
        used.add(gguf_name)
    if extra := sorted(set(tensors) - used):
        raise NimaError(f"{src} holds tensors a plain Llama model has not: {extra[:4]}",
                        "not a plain Llama model (biases, extra heads?)")
    model = build_model(cfg, weights, src)
    name = meta.get("general.name") or src.stem
    origin = {"format": "gguf", "path": str(src.resolve()), "sha256": sha256_file(src), "name": name,
              "file_type": meta.get("general.file_type"), "tensor_types": dict(sorted(types.items())),
              "tokenizer": meta.get("tokenizer.ggml.model"), "pre_tokenizer": meta.get("tokenizer.ggml.pre")}
    log(f"writing {out} ({model.num_parameters():,} parameters, tokenizer {tok.kind}, "
        f"weights decoded from {', '.join(sorted(types))})")
    return checkpoint.save(out, model, tok, meta={"origin": origin, "name": str(name)})
