"""Import a local Hugging Face LlamaForCausalLM directory (what `huggingface-cli download` leaves).

Reads config.json (transformers 4 or 5 layout: the config class decides what it supports),
model.safetensors or the shards named by model.safetensors.index.json (float32, float16 or bfloat16,
converted to float32), tokenizer.json with tokenizer_config.json / generation_config.json /
chat_template.jinja. Refused with the reason: custom code (auto_map), other architectures,
pre-quantized weights (quantization_config), pickled weights without safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from nima_edge import checkpoint
from nima_edge.atomic import sha256_file
from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.importer.build import build_model
from nima_edge.tokenizer import Tokenizer

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise NimaError(f"{src} has no config.json", "pass the model's directory (as downloaded from the Hub)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NimaError(f"{path} is not valid JSON: {e}", "download the model again") from e
    if config.get("auto_map"):
        raise NimaError(f"{path} asks for custom modelling code (auto_map: trust_remote_code); nima-edge runs "
                        "only its own Llama implementation and never executes a model's code",
                        "import a model that loads as a plain LlamaForCausalLM")
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" or archs != ["LlamaForCausalLM"]:
        raise NimaError(f"{path} describes {archs} (model_type {config.get('model_type')!r}); nima-edge imports "
                        "LlamaForCausalLM only", "pick a Llama-family model (SmolLM2, TinyLlama, Llama-3.2, ...)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise NimaError(f"{path} holds pre-quantized weights ({method})",
                        "import the float (fp32/fp16/bf16) release; nima-edge quantizes it itself")
    return config


def weight_files(src: Path) -> list[Path]:
    index = src / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise NimaError(f"{index} is unreadable: {e}", "download the model again") from e
        files = [src / n for n in names]
        if missing := [f.name for f in files if not f.is_file()]:
            raise NimaError(f"{src} lacks shard(s) {missing[:3]} named in {INDEX}",
                            "the download is incomplete; fetch the missing files")
        return files
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if any(src.glob("*.bin")) or any(src.glob("*.pth")):
        raise NimaError(f"{src} has only pickled weights (*.bin/*.pth), which nima-edge does not unpickle",
                        "download the safetensors files (most repositories have them), or convert with "
                        "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)")
    raise NimaError(f"{src} has no model.safetensors (nor {INDEX})", "download the model's safetensors weights")


def read_weights(files: list[Path]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor as float32, and the source dtypes seen."""
    weights, dtypes = {}, set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if t.dtype not in FLOAT_DTYPES:
                        raise NimaError(f"{path.name}: {name} is {t.dtype}, not a float weight",
                                        "import the float (fp32/fp16/bf16) release of the model")
                    dtypes.add(str(t.dtype).removeprefix("torch."))
                    weights[name] = t.to(torch.float32)
        except (SafetensorError, OSError) as e:
            raise NimaError(f"{path} is corrupt or truncated: {e}", "download it again") from e
    return weights, dtypes


def import_hf(src: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    config = read_config(src)
    cfg = ModelConfig.from_hf(config)
    if not (src / "tokenizer.json").is_file():
        raise NimaError(f"{src} has no tokenizer.json (only a slow tokenizer such as tokenizer.model?)",
                        "save the fast tokenizer with transformers: "
                        "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    tok = Tokenizer.from_file(src / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise NimaError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} rows",
                        "the tokenizer.json belongs to another model")
    files = weight_files(src)
    log(f"reading {len(files)} weight file(s) from {src}")
    weights, dtypes = read_weights(files)
    model = build_model(cfg, weights, src)
    origin = {"format": "huggingface", "path": str(src.resolve()), "name": config.get("_name_or_path") or src.name,
              "dtype": sorted(dtypes), "files": [{"name": f.name, "sha256": sha256_file(f)} for f in files]}
    log(f"writing {out} ({model.num_parameters():,} parameters, tokenizer {tok.kind})")
    return checkpoint.save(out, model, tok, meta={"origin": origin, "name": origin["name"].rsplit("/", 1)[-1]})
