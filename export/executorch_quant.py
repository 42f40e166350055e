"""torchao quantization of the decoder linears for XNNPACK, carrying our quantization result where it fits.

Both schemes are torchao's Int8DynamicActivationIntxWeightConfig (int8 per-token dynamic activations,
symmetric integer weights), which is what ExecuTorch's export_llama uses for `8da4w`/`8da8w` and what
the XNNPACK partitioner lowers to its dynamically-quantized fully-connected kernels. Weight-only
torchao configs are deliberately not offered: on executorch 1.5.1 they lower but return garbage.

- 8da4w: XNNPACK's blockwise int4 (qb4w) layout is ours: symmetric codes per group along the input
  dimension. The result's codes go in unchanged (qdata = code - 8); its fp16-exact scales go in too,
  but XNNPACK stores blockwise scales as bf16, so they are rounded fp16 -> bf16 at lowering
  (relative error <= 2**-9 per group). Needs a 4-bit symmetric result; an unquantized checkpoint
  gets the core's round-to-nearest (nima_edge/quantization.py rtn) on the fly.
- 8da8w: XNNPACK has no blockwise int8 weights, only one scale per output channel, so a grouped
  8-bit (Q8_0-style) result cannot be carried as is. The result's dequantized weights are
  re-quantized per output channel by torchao (round-to-nearest); a float checkpoint is quantized
  per channel directly.
Embeddings and lm_head stay float, as in the quantization core.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM

DEFAULT_GROUP = 32


def _config(bits: int, group_size: int | None):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if bits == 4 else torch.int8,
        weight_granularity=PerGroup(group_size) if group_size else PerAxis(0))


def _quantize_linear(linear: torch.nn.Linear, bits: int, group_size: int | None) -> None:
    from torchao.quantization import quantize_
    quantize_(linear, _config(bits, group_size))


@torch.no_grad()
def _load_codes(linear: torch.nn.Linear, q) -> None:
    """Overwrite the torchao weight's qdata/scale/zero_point with our result (export/packing.py layout).

    torchao's config builds the tensor with the right block size and activation quantization; only
    its numbers are replaced, so the .pte carries our codes.
    """
    from nima_edge.export.packing import pack_intx
    w = linear.weight
    for name, value in zip(("qdata", "scale", "zero_point"), pack_intx(q)):
        getattr(w, name).copy_(value.reshape(getattr(w, name).shape))


def _check_8da4w(result: dict) -> None:
    for name, q in result.items():
        if q.bits != 4 or not q.symmetric:
            kind = f"{q.bits}-bit {'symmetric' if q.symmetric else 'asymmetric'}"
            raise NimaError(f"8da4w packs 4-bit symmetric codes, but {name} is {kind}",
                            "quantize with --bits 4 (symmetric), or export with --quant 8da8w")


def quantize_for_xnnpack(model: NimaForCausalLM, ckpt: Path, quant: str, group_size: int | None = None) -> dict:
    """Quantize `model`'s decoder linears in place; return a description for the manifest."""
    from nima_edge.checkpoint import read_meta
    from nima_edge.quantization import apply_quant, load_quant, quantizable, result_plan, rtn_model, substitutions

    linears = quantizable(model)
    result = load_quant(ckpt)
    if quant == "8da4w":
        if result is None:
            group_size = group_size or DEFAULT_GROUP
            result = rtn_model(model, 4, group_size)
            source = f"rtn 4-bit group {group_size} on the fly (checkpoint carries no quantization result)"
        else:
            source = "the checkpoint's quantization result (codes exact; group scales fp16 -> bf16 in XNNPACK)"
            group_size = read_meta(ckpt).get("quantization", {}).get("group_size")
        _check_8da4w(result)
        plan = substitutions(result_plan(model, result), group_size)
        for name, q in result.items():
            _quantize_linear(linears[name], 4, q.group_size)
            _load_codes(linears[name], q)
        groups = sorted({q.group_size for q in result.values()})
        method = sorted({q.method for q in result.values()})
        return {"scheme": "8da4w", "weights": "int4 symmetric per group", "group_size": groups,
                "method": method, "source": source, "activations": "int8 asymmetric per token (dynamic)",
                "substitutions": plan, "float_linears": sorted(set(linears) - set(result))}
    if quant == "8da8w":
        if result is not None:
            apply_quant(model, result)  # our numbers, then the only int8 layout XNNPACK has
            source = "the checkpoint's quantization result, dequantized and re-quantized per output channel"
        else:
            source = "float weights, quantized per output channel"
        for m in linears.values():
            _quantize_linear(m, 8, None)
        return {"scheme": "8da8w", "weights": "int8 symmetric per output channel (torchao rtn)", "source": source,
                "activations": "int8 asymmetric per token (dynamic)"}
    raise NimaError(f"unknown XNNPACK quantization {quant!r}", "use 8da4w or 8da8w")
