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
from nima_edge.atomic import write_bytes
from nima_edge.errors import NimaError
from nima_edge.export.onnx_weights import blocked_dq_tensors, quant_result, set_nodes
from nima_edge.quantization import QuantizedWeight, apply_quant
from nima_edge.manifest import write_manifest
from nima_edge.model import NimaForCausalLM, apply_rope

TARGET = "onnx-portable"
OPSET = 21  # blocked DequantizeLinear and int4 tensors need opset 21
DEFAULT_GROUP = 128  # on-the-fly RTN: TensorRT's int4 weight-only block size
META_TOKENIZER, META_CONFIG, META_QUANT = "nima.tokenizer", "nima.config", "nima.quant"
META_TOKENIZER_SETTINGS = "nima.tokenizer.settings"  # Tokenizer.settings_json()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class KVCacheLlama(nn.Module):
    """The model with the cache as tensors in and out: present = concat(past, new) per layer."""

    def __init__(self, model: NimaForCausalLM):
        super().__init__()
        self.m = model
        cfg = model.config
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def _attention(self, attn, x, cos, sin, past_k, past_v, mask):
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        rep = self.n_heads // self.n_kv
        k_rep = k_all.repeat_interleave(rep, dim=1) if rep > 1 else k_all  # HF repeat_kv grouping
        v_rep = v_all.repeat_interleave(rep, dim=1) if rep > 1 else v_all
        scores = (q @ k_rep.transpose(-1, -2)) * (self.hd ** -0.5)
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)
        y = (probs @ v_rep).transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return attn.o_proj(y), k_all, v_all

    def forward(self, input_ids, attention_mask, position_ids, *past):
        T = input_ids.shape[1]
        total = attention_mask.shape[1]
        # query i sits at cache slot total - T + i and sees every unpadded slot up to its own
        slots = torch.arange(total, device=input_ids.device)
        causal = slots[None, :] <= (slots[total - T:])[:, None]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        cos = self.m.rope_cos[position_ids].unsqueeze(1)
        sin = self.m.rope_sin[position_ids].unsqueeze(1)
        x = self.m.model.embed_tokens(input_ids)
        present = []
        for i, layer in enumerate(self.m.model.layers):
            a, k, v = self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin,
                                      past[2 * i], past[2 * i + 1], mask)
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            present += [k, v]
        return (self.m.lm_head(self.m.model.norm(x)), *present)


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


def build(ckpt: Path, quant: str, group_size: int = DEFAULT_GROUP) -> onnx.ModelProto:
    """The checked ModelProto for `ckpt` at `quant` (f32 | int8 | int4)."""
    model, tok = checkpoint.load(ckpt)
    qweights = quant_result(ckpt, model, quant, TARGET, group_size)
    if qweights:
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
    return proto


def export(ckpt: Path, out: Path, quant: str = "f32", group_size: int = DEFAULT_GROUP) -> Path:
    if out.suffix != ".onnx":
        raise NimaError(f"--out {out} does not end in .onnx", "name the portable artifact like model.onnx")
    proto = build(ckpt, quant, group_size)
    write_bytes(out, proto.SerializeToString())
    write_manifest(out, TARGET, quant, ckpt, opset=OPSET,
                   weights=_weights_summary(proto))
    return out


def _weights_summary(proto: onnx.ModelProto) -> dict:
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    return {"dequantize_linear": len(dq), "block_size": sorted({a.i for n in dq for a in n.attribute
                                                               if a.name == "block_size"})}
