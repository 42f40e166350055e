"""A PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF (`export --target gguf --lora ADAPTER`).

The file is what llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads:
- metadata general.type = "adapter", general.architecture = "llama", adapter.type = "lora",
  adapter.lora.alpha (float32);
- per adapted weight, two tensors named after the base model's GGUF tensor: `<name>.lora_a`
  [rank, in] and `<name>.lora_b` [out, rank] (numpy order, as PEFT stores A and B).
llama.cpp adds scale * (alpha / rank) * B A x to the base layer's output, as PEFT does, so the
adapter loads beside the base model's GGUF (llama-cpp-python: Llama(lora_path=...)) and changes
its logits as the adapter changes ours. Q/K weights are stored in llama.cpp's interleaved RoPE row
order (export/gguf.py permute_rows); only B's rows are outputs, so only lora_b is permuted.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from nima_edge import checkpoint
from nima_edge.atomic import temp_file
from nima_edge.errors import NimaError
from nima_edge.export.gguf import permute_rows
from nima_edge.manifest import publish_file

QUANTS = {"f32": np.float32, "f16": np.float16}
PEFT_PREFIX = "base_model.model."


def read_adapter(adapter: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(adapter_config.json, {HF weight name: (A, B)}) of a PEFT LoRA adapter directory."""
    fix = "pass the adapter directory a fine-tune wrote (OUT/adapter: adapter_config.json + adapter_model.safetensors)"
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise NimaError(f"{adapter} is not a readable PEFT adapter: {e}", fix) from e
    if config.get("peft_type") != "LORA":
        raise NimaError(f"{adapter} holds a {config.get('peft_type')} adapter, not LoRA", fix)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}.weight" in key:
                base = key.removeprefix(PEFT_PREFIX).replace(f".{part}.weight", ".weight")
                pairs.setdefault(base, {})[part] = t
                break
        else:
            raise NimaError(f"{adapter}: tensor {key} is not a LoRA A/B matrix", "only LoRA on linear layers is exported")
    incomplete = [k for k, v in pairs.items() if len(v) != 2]
    if incomplete:
        raise NimaError(f"{adapter}: {incomplete[0]} lacks its lora_A or lora_B", fix)
    return config, {k: (v["lora_A"], v["lora_B"]) for k, v in sorted(pairs.items())}


def export_adapter(ckpt: Path, adapter: Path, out: Path, quant: str = "f32") -> Path:
    """Write the llama.cpp adapter GGUF for `adapter`, whose base model is the checkpoint `ckpt`."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise NimaError(f"a LoRA adapter GGUF is written as f32 or f16, not {quant!r}", "pass --quant f32 or f16")
    if out.suffix != ".gguf":
        raise NimaError(f"--out {out} does not end in .gguf", "name the adapter like adapter.gguf")
    config, pairs = read_adapter(adapter)
    model, _ = checkpoint.load(ckpt)
    cfg = model.config
    weights = dict(model.named_parameters())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    rank = None
    with temp_file(out) as tmp:  # the adapter and its manifest are swapped in together
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        w.add_name(checkpoint.read_meta(ckpt).get("preset") or "nima")
        for hf_name, (a, b) in pairs.items():
            base = weights.get(hf_name)
            if base is None or a.shape[1] != base.shape[1] or b.shape[0] != base.shape[0]:
                raise NimaError(f"the adapter's {hf_name} (A {a.shape}, B {b.shape}) does not fit {ckpt}"
                                + ("" if base is None else f" ({tuple(base.shape)})"),
                                "pass the base checkpoint the adapter was trained on")
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if name is None:
                raise NimaError(f"no GGUF name for {hf_name}", "LoRA is exported for the decoder linears only")
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
                b = b[permute_rows(b.shape[0], heads)]
            rank = a.shape[0]
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=QUANTS[quant]))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=QUANTS[quant]))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        publish_file(tmp, out, "gguf", quant, ckpt, gguf={
            "kind": "lora adapter: load it beside the base model's GGUF (llama-cpp-python: Llama(lora_path=...))",
            "adapter": str(adapter), "rank": rank, "alpha": config["lora_alpha"], "tensors": len(pairs) * 2})
    return out
