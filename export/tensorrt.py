"""Target "tensorrt": a TensorRT engine built from the portable ONNX graph with TensorRT's Python API.

The network is strongly typed (TensorRT 10/11), so precision comes from the graph: fp32 activations,
and for int4 the blocked DequantizeLinear weights of the portable export (weight-only int4).
Two optimization profiles: 0 for prefill (any prompt length), 1 for decode (one token, any past).
The artifact is a directory: model.engine, tokenizer.json, nima_trt.json (config and I/O names), manifest.json.

TensorRT needs an NVIDIA GPU; it cannot be installed on CPU-only machines.
"""
from __future__ import annotations

import json
from pathlib import Path

from nima_edge import checkpoint
from nima_edge.atomic import atomic_dir
from nima_edge.errors import NimaError
from nima_edge.export import onnx_portable
from nima_edge.quantization import load_quant
from nima_edge.manifest import write_manifest
from nima_edge.runtimes.tensorrt_format import CONFIG_FILE, ENGINE_FILE, import_tensorrt
from nima_edge.targets import TARGETS

TARGET = "tensorrt"
QUANTS = tuple(TARGETS["tensorrt"].schemes)  # the registry says which schemes exist


def profiles(cfg: dict, inputs: list[str]) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """(min, opt, max) shapes per input for the prefill and the decode profile, batch 1."""
    ctx, kv, hd = cfg["max_position_embeddings"], cfg["num_key_value_heads"], cfg["head_dim"]
    out = []
    for seq, past_opt in (((1, min(16, ctx), ctx), 0), ((1, 1, 1), ctx // 2)):
        total = (1, seq[1] + past_opt, ctx)
        shapes = {"input_ids": tuple((1, n) for n in seq), "position_ids": tuple((1, n) for n in seq),
                  "attention_mask": tuple((1, n) for n in total)}
        past = ((1, kv, 0, hd), (1, kv, past_opt, hd), (1, kv, ctx - 1, hd))
        shapes |= {name: past for name in inputs[3:]}
        out.append(shapes)
    return out


def build_engine(onnx_bytes: bytes, cfg: dict, inputs: list[str], workspace_gib: float = 4.0) -> bytes:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # the only mode in TensorRT 11
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NimaError(f"TensorRT's ONNX parser rejected the portable graph: {errors[:500]}",
                        "check the TensorRT version (10 or newer is needed for int4 DequantizeLinear)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):  # fp32 means fp32: TF32 GEMMs would cost the 1e-4 parity with PyTorch
        config.clear_flag(trt.BuilderFlag.TF32)
    for shapes in profiles(cfg, inputs):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise NimaError("TensorRT failed to build the engine (see its log above)",
                        "try --quant f32, or a TensorRT version that supports int4 weight-only GEMMs on this GPU")
    return bytes(engine)


def export(ckpt: Path, out: Path, quant: str = "f32", group_size: int = onnx_portable.DEFAULT_GROUP,
           context: int | None = None) -> Path:
    """`context`: the longest sequence the engine's optimization profiles admit (default: the declared
    context capped at 2048, as the portable ONNX records it)."""
    if quant not in QUANTS:
        raise NimaError(f"quant {quant!r} is not available for --target tensorrt",
                        "use --quant f32 or int4 (TensorRT's int8 weights are per-channel, our int8 result is "
                        "per-group; export int8 to onnx-portable instead)")
    result = load_quant(ckpt) if quant == "int4" else None
    if result and not all(q.symmetric for q in result.values()):
        raise NimaError("TensorRT dequantizes with zero points of 0 only; this quantization result is asymmetric",
                        "re-run nima-edge quantize without --asymmetric for the tensorrt target")
    trt = import_tensorrt()
    # The quantization core keeps every scale positive and symmetric int4 codes in -8..7 with no zero
    # point: exactly the DequantizeLinear form TensorRT accepts, so the portable graph is used as is.
    proto, info = onnx_portable.build(ckpt, quant, group_size, context)
    model, tok = checkpoint.load(ckpt)
    # the engine's shape profiles and the runtime's context length follow the chosen context
    cfg = {**model.config.to_hf(), "max_position_embeddings": info["max_context"]}
    inputs, outputs = onnx_portable.io_names(cfg["num_hidden_layers"])
    engine = build_engine(proto.SerializeToString(), cfg, inputs)
    with atomic_dir(out) as tmp:
        (tmp / ENGINE_FILE).write_bytes(engine)
        tok.save(tmp / "tokenizer.json")
        for name, content in tok.config_files(cfg["max_position_embeddings"]).items():  # specials, end ids, template
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps({"config": cfg, "inputs": inputs, "outputs": outputs,
                                                   "profiles": {"prefill": 0, "decode": 1}}, indent=2) + "\n")
        write_manifest(tmp, TARGET, quant, ckpt, tensorrt=trt.__version__, max_context=info["max_context"])
    return out
