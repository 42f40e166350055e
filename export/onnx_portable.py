"""Target "onnx-portable": one standard-op .onnx file from torch.onnx.export with an explicit KV cache.

Inputs input_ids, attention_mask, position_ids, past_key_values.N.key/value; outputs logits and
present.N.key/value (optimum's names, so ORTModelForCausalLM can load it beside a config.json).
Quantized weights become blocked DequantizeLinear (int4/int8 codes, block = group size, axis 0) + MatMul,
which ONNX Runtime runs and TensorRT consumes as weight-only quantization. The tokenizer and model
config ride in the file's metadata, so the one file is the whole artifact.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper, version_converter

from nima_edge import checkpoint
from nima_edge.atomic import temp_file
from nima_edge.errors import NimaError
from nima_edge.export.onnx_weights import blocked_dq_tensors, plan_substitutions, quant_result, set_nodes
from nima_edge.config import check_context
from nima_edge.quantization import QuantizedWeight, apply_quant
from nima_edge.manifest import publish_file
from nima_edge.runtimes.onnx_portable_format import (META_CONFIG, META_QUANT, META_TOKENIZER, META_TOKENIZER_SETTINGS,
                                                     io_names)
from nima_edge.model import SDPA, NimaForCausalLM, repeat_kv

TARGET = "onnx-portable"
OPSET = 21  # blocked DequantizeLinear and int4 tensors need opset 21
DEFAULT_GROUP = 128  # on-the-fly RTN: TensorRT's int4 weight-only block size


class PastPresent:
    """The KV-cache seam as graph I/O: one layer's past keys/values in, present = concat(past, new) out."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.k, self.v = past_k, past_v

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class MaskedSDPA(SDPA):
    """The attention-kernel seam for ONNX: matmul + softmax with a large negative fill, so a fully masked
    (left-padded) query row stays finite; torch's SDPA gives NaN there, which the next layer spreads."""

    def forward(self, q, k, v, mask, input_pos=None):
        rep = self.n_heads // self.n_kv
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        scores = (q @ k.transpose(-1, -2)) * (self.head_dim ** -0.5)
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)
        return self.merge_heads(probs @ v)


class KVCacheLlama(nn.Module):
    """The model's own forward with the cache as tensors in and out (PastPresent) and MaskedSDPA swapped in."""

    def __init__(self, model: NimaForCausalLM):
        super().__init__()
        self.m = model.replace_sdpa(lambda attn: MaskedSDPA(attn.n_heads, attn.n_kv, attn.hd))

    def forward(self, input_ids, attention_mask, position_ids, *past):
        T = input_ids.shape[1]
        total = attention_mask.shape[1]
        # query i sits at cache slot total - T + i and sees every unpadded slot up to its own
        slots = torch.arange(total, device=input_ids.device)
        causal = slots[None, :] <= (slots[total - T:])[:, None]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        caches = [PastPresent(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits = self.m.lm_head(self.m.hidden_states(input_ids, position_ids, mask, caches))
        return (logits, *[t for c in caches for t in (c.k, c.v)])


def _trace(model: NimaForCausalLM) -> onnx.ModelProto:
    cfg = model.config
    inputs, outputs = io_names(cfg.num_hidden_layers)
    past_len, T = 3, 2  # example sizes; every length is a dynamic axis
    past = [torch.zeros(1, cfg.num_key_value_heads, past_len, cfg.head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    args = (torch.zeros(1, T, dtype=torch.long), torch.ones(1, past_len + T, dtype=torch.long),
            torch.arange(past_len, past_len + T)[None], *past)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs[3:]}
    axes |= {n: {0: "batch_size", 2: "total_sequence_length"} for n in outputs[1:]}
    buf = io.BytesIO()
    with torch.no_grad():
        # The TorchScript exporter: stable input/output names and dynamic axes for a plain tensor graph.
        torch.onnx.export(KVCacheLlama(model).eval(), args, buf, dynamo=False, opset_version=20,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    return version_converter.convert_version(onnx.load_from_string(buf.getvalue()), OPSET)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    dtype = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return helper.make_tensor(name, dtype, values.shape, values.reshape(-1).tolist())


def insert_dequantize(proto: onnx.ModelProto, qweights: dict[str, QuantizedWeight]) -> None:
    """Swap each MatMul's float weight (the traced W.T of a quantized linear) for DequantizeLinear of its codes.

    Weights are matched by value: the traced graph holds exactly dequantize().T for every quantized linear.
    """
    wanted = {_digest(q.dequantize().T.numpy()): (name, q) for name, q in qweights.items()}
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    found, nodes = set(), []
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" else None
        hit = wanted.get(_digest(numpy_helper.to_array(inits[w]))) if w in inits else None
        if hit is None:
            nodes.append(node)
            continue
        name, q = hit
        codes, scales, zeros = blocked_dq_tensors(q)
        base = name.removesuffix(".weight")
        dq_inputs = [f"{base}.qweight", f"{base}.scales"]
        graph.initializer.extend([_int_tensor(dq_inputs[0], codes, q.bits, zeros is None),
                                  numpy_helper.from_array(scales, dq_inputs[1])])
        if zeros is not None:
            dq_inputs.append(f"{base}.zero_points")
            graph.initializer.append(_int_tensor(dq_inputs[2], zeros, q.bits, signed=False))
        nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [f"{base}.dequantized"],
                                      name=f"{base}/DequantizeLinear", axis=0, block_size=q.group_size))
        node.input[1] = f"{base}.dequantized"
        nodes.append(node)
        found.add(name)
    if missing := set(qweights) - found:
        raise RuntimeError(f"traced graph lacks the MatMul weights of {sorted(missing)[:3]}")
    set_nodes(graph, nodes)


def build(ckpt: Path, quant: str, group_size: int = DEFAULT_GROUP,
          context: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """The checked ModelProto for `ckpt` at `quant` (f32 | int8 | int4), and what its manifest records
    (the context and the quantization plan's substitutions)."""
    model, tok = checkpoint.load(ckpt)
    info = {"max_context": check_context(model.config, context)}
    qweights = quant_result(ckpt, model, quant, TARGET, group_size)
    if qweights:
        info["substitutions"] = plan_substitutions(ckpt, model, qweights, group_size)
        apply_quant(model, qweights)  # the traced graph then holds exactly dequantize().T per linear
    proto = _trace(model)
    if qweights:
        insert_dequantize(proto, qweights)
    meta = {META_TOKENIZER: tok.hf.to_str(), META_TOKENIZER_SETTINGS: tok.settings_json(),
            META_CONFIG: json.dumps(model.config.to_hf()), META_QUANT: quant}
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    proto.producer_name = "nima-edge"
    onnx.checker.check_model(proto, full_check=True)
    return proto, info


def export(ckpt: Path, out: Path, quant: str = "f32", group_size: int = DEFAULT_GROUP, context: int | None = None,
           **_) -> Path:
    """`context`: the longest sequence the artifact is meant for (default: the declared context capped at
    2048); the graph itself takes any past length, so it is recorded, not baked in."""
    if out.suffix != ".onnx":
        raise NimaError(f"--out {out} does not end in .onnx", "name the portable artifact like model.onnx")
    proto, info = build(ckpt, quant, group_size, context)
    with temp_file(out) as tmp:  # the artifact and its manifest are swapped in together
        tmp.write_bytes(proto.SerializeToString())
        publish_file(tmp, out, TARGET, quant, ckpt, opset=OPSET, weights=_weights_summary(proto), **info)
    return out


def _weights_summary(proto: onnx.ModelProto) -> dict:
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    return {"dequantize_linear": len(dq), "block_size": sorted({a.i for n in dq for a in n.attribute
                                                               if a.name == "block_size"})}
