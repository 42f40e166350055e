"""Checkpoints are Hugging Face directories: config.json (LlamaForCausalLM), model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json, plus nima.json for our metadata.
Written atomically as a whole directory; never pickled. A quantized checkpoint also carries the
quantization result (nima_edge/quantization.py) and stands for its fake-quant model (load_model).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nima_edge.atomic import atomic_dir, sha256_file
from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM
from nima_edge.quantization import QUANT_JSON, QuantizedWeight, apply_quant, describe, load_quant, result_files
from nima_edge.tokenizer import Tokenizer

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def state_dict_for_save(model: NimaForCausalLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")  # shared with embed_tokens; HF drops it too
    return sd


def save(out_dir: str | Path, model: NimaForCausalLM, tokenizer: Tokenizer, meta: dict | None = None,
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the checkpoint directory; the old one (if any) is replaced only once the new one is complete."""
    cfg = model.config
    with atomic_dir(out_dir) as tmp:
        _json(tmp / "config.json", cfg.to_hf())
        save_file(state_dict_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        # the tokenizer's own settings (ours: <|bos|>/<|eos|>/<|pad|> and CHAT_TEMPLATE; an import's: its own)
        for name, content in tokenizer.config_files(cfg.max_position_embeddings).items():
            _json(tmp / name, content)
        _json(tmp / "nima.json", {"tokenizer": tokenizer.kind, "dropout": cfg.dropout, **(meta or {})})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def read_meta(ckpt_dir: str | Path) -> dict:
    p = Path(ckpt_dir) / "nima.json"
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NimaError(f"{p} is not valid JSON ({e})", "restore the checkpoint from a good copy, or re-save it") from e
    if not isinstance(meta, dict):
        raise NimaError(f"{p} holds a {type(meta).__name__}, not nima-edge's checkpoint metadata",
                        "restore the checkpoint from a good copy, or re-save it")
    return meta


def checkpoint_hash(ckpt_dir: str | Path) -> str:
    """sha256 of the weights file: the identity of a checkpoint in manifests."""
    return sha256_file(Path(ckpt_dir) / "model.safetensors")


def load(ckpt_dir: str | Path, device: str = "cpu") -> tuple[NimaForCausalLM, Tokenizer]:
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise NimaError(f"checkpoint {ckpt} does not exist or is not a directory",
                        "pass a checkpoint directory written by nima-edge train (it holds config.json)")
    for name in REQUIRED:
        if not (ckpt / name).is_file():
            raise NimaError(f"checkpoint {ckpt} has no {name}", "re-save the checkpoint; it is incomplete")
    try:
        cfg = ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise NimaError(f"{ckpt / 'config.json'} is not valid JSON: {e}", "re-save the checkpoint") from e
    cfg.dropout = read_meta(ckpt).get("dropout", 0.0)
    try:
        sd = load_file(str(ckpt / "model.safetensors"), device=device)
    except (SafetensorError, OSError) as e:
        raise NimaError(f"{ckpt / 'model.safetensors'} is corrupt or truncated: {e}",
                        "restore it from a good copy or re-train; a partial download also looks like this") from e
    if bad := [name for name, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise NimaError(f"{ckpt / 'model.safetensors'} holds NaN or Inf values in {', '.join(sorted(bad)[:3])}"
                        + (f" and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""),
                        "the training run diverged or the file was damaged; use an earlier checkpoint "
                        "(e.g. OUT/last) or re-train with a lower learning rate")
    model = NimaForCausalLM(cfg).to(device)
    if cfg.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}" if missing or unexpected else None
    except RuntimeError as e:  # shape mismatches
        problem = str(e).splitlines()[-1].strip()
    if problem:
        raise NimaError(f"{ckpt / 'model.safetensors'} does not match its config.json ({problem})",
                        "the weights and config come from different models; re-save the checkpoint")
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise NimaError(f"tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}",
                        "the tokenizer.json belongs to another model")
    return model.eval(), tok


# --- the model a checkpoint stands for ---------------------------------------------------------------

def save_quantized(out_dir: str | Path, model: NimaForCausalLM, tokenizer: Tokenizer,
                   qweights: dict[str, QuantizedWeight], meta: dict | None = None, info: dict | None = None) -> Path:
    """A full checkpoint: the float weights of `model`, plus quantization.safetensors/.json (atomic)."""
    files, summary = result_files(qweights, info)
    return save(out_dir, model, tokenizer, meta={**(meta or {}), "quantization": summary}, extra_files=files)


def load_model(ckpt_dir: str | Path) -> tuple[NimaForCausalLM, Tokenizer, str | None]:
    """The model a checkpoint stands for: the fake-quant model when it carries a quantization result
    (with a description of the scheme), else the float model (and None)."""
    model, tok = load(ckpt_dir)
    qweights = load_quant(ckpt_dir)
    if qweights is None:
        return model, tok, None
    return apply_quant(model, qweights).eval(), tok, describe(qweights)


def fake_quant_model(ckpt_dir: str | Path) -> tuple[NimaForCausalLM, Tokenizer]:
    """The PyTorch reference for quantized artifacts: float model with every quantized linear dequantized."""
    model, tok, scheme = load_model(ckpt_dir)
    if scheme is None:
        raise NimaError(f"{ckpt_dir} carries no quantization result ({QUANT_JSON})",
                        f"run: nima-edge quantize {ckpt_dir} --bits 4 --group 32 --out DIR")
    return model, tok


def trained_context(ckpt: str | Path, model: NimaForCausalLM) -> int:
    """The window length the model was trained on (nima.json), else its full context: calibrating on
    positions it never saw in training would feed GPTQ activations unlike those of real use."""
    train_config = read_meta(ckpt).get("training", {}).get("train_config", {})
    return int(train_config.get("context") or model.config.max_position_embeddings)
