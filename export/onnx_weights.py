"""Which quantized weights an ONNX export carries, and how they are laid out in ONNX tensors.

Both ONNX flavours only *pack* the one quantization result (nima_edge/quantization.py): the checkpoint's own
when it has one, else round-to-nearest on the fly. Packing is exact (codes, fp16-exact scales and zero
points are copied, never re-derived), so the artifact computes what fake_quant_model computes.
MatMulNBits packing lives in export/packing.py; the standard-ONNX blocked layout is here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nima_edge import checkpoint
from nima_edge.errors import NimaError
from nima_edge.quantization import QuantizedWeight, load_quant, result_plan, rtn_model, substitutions
from nima_edge.model import NimaForCausalLM

QUANTS = {"f32": None, "int8": 8, "int4": 4}


def check_quant(quant: str, target: str) -> int | None:
    if quant not in QUANTS:
        raise NimaError(f"quant {quant!r} is not available for --target {target}",
                        f"use --quant {' | '.join(QUANTS)}")
    return QUANTS[quant]


def quant_result(ckpt: Path, model: NimaForCausalLM, quant: str, target: str,
                 default_group: int) -> dict[str, QuantizedWeight] | None:
    """The result to pack for `quant` (None for f32): the checkpoint's, else RTN (symmetric, default_group
    along the group plan: a width it does not divide gets a smaller group or stays float)."""
    bits = check_quant(quant, target)
    if bits is None:
        return None
    result = load_quant(ckpt)
    if result is None:
        return rtn_model(model, bits, default_group)
    found = {q.bits for q in result.values()}
    if found != {bits}:
        raise NimaError(f"{ckpt} holds a {'/'.join(map(str, sorted(found)))}-bit quantization result, "
                        f"but --quant {quant} asks for {bits}-bit",
                        f"export with --quant int{min(found)}, or re-run nima-edge quantize --bits {bits}")
    return result


def plan_substitutions(ckpt: Path, model: NimaForCausalLM, qweights: dict[str, QuantizedWeight],
                       default_group: int) -> list[dict]:
    """The tensors of `qweights` that did not get the requested group (the checkpoint's quantize --group,
    else the exporter's), for the manifest: a smaller group, or left float."""
    requested = checkpoint.read_meta(ckpt).get("quantization", {}).get("group_size", default_group)
    return substitutions(result_plan(model, qweights), requested)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dimension (the fused q|k|v projection); all must share one grid."""
    first = parts[0]
    if any((p.bits, p.group_size, p.symmetric) != (first.bits, first.group_size, first.symmetric) for p in parts):
        raise NimaError("q/k/v projections were quantized with different bits or group sizes",
                        "re-run nima-edge quantize with one --bits/--group for the whole model")
    return QuantizedWeight(codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
                           zeros=torch.cat([p.zeros for p in parts]), bits=first.bits,
                           group_size=first.group_size, symmetric=first.symmetric, method=first.method)


def blocked_dq_tensors(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Standard-ONNX DequantizeLinear inputs for W.T [K, N] blocked along K (axis 0, block = group size):
    symmetric results become signed codes (code - zero) with no zero point, as TensorRT wants; asymmetric
    ones keep unsigned codes with their zero points. Returns (codes [K, N], scales [K/g, N], zeros or None).
    """
    codes = q.codes.numpy().astype(np.int16)
    if q.symmetric:
        signed = codes - (1 << (q.bits - 1))
        return signed.T.astype(np.int8), q.scales.numpy().T.astype(np.float32), None
    return codes.T.astype(np.uint8), q.scales.numpy().T.astype(np.float32), q.zeros.numpy().T.astype(np.uint8)


def set_nodes(graph, nodes: list) -> None:
    """Replace the graph's nodes and drop the initializers no node reads any more (the float weights
    a quantized node took over)."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
