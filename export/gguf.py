"""GGUF export (llama.cpp): `nima-edge export CKPT --target gguf --quant f32|f16|q8_0|q4_0|q4_k_m|...`.

F32, F16, Q8_0 and Q4_0 are written directly with gguf-py. Q8_0/Q4_0 pack the checkpoint's
quantization result (GPTQ or RTN, export/quantize.py) when it has one, block for block, so stock
llama.cpp runs exactly the reference's numbers; otherwise gguf-py's quantizers (bit-exact with
llama.cpp's) round the float weights. Every other llama.cpp type goes through llama.cpp's own
quantizer (llama_model_quantize) from an F32 file, and the per-tensor fallbacks it makes are reported.
"""
from __future__ import annotations

import ctypes
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from nima_edge import checkpoint
from nima_edge.atomic import temp_file
from nima_edge.errors import NimaError
from nima_edge.export.gguf_tokenizer import Writer, add_tokenizer
from nima_edge.export.packing import pack_gguf
from nima_edge.manifest import publish_file
from nima_edge.targets import TARGETS


Q = gguf.GGMLQuantizationType
# quant name -> (type of the decoder linears, file type) for the types written directly
DIRECT = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# every other scheme of the registry is handed to llama.cpp's quantizer from the float weights
QUANTS = tuple(TARGETS["gguf"].schemes)
RESULT_BITS = {"q8_0": 8, "q4_0": 4}


def export(ckpt: Path, out: Path, quant: str, threads: int | None = None, lora: Path | None = None,
           **_options) -> Path:
    if lora is not None:  # a fine-tune's PEFT adapter, written to load beside CKPT's own GGUF
        from nima_edge.export.gguf_lora import export_adapter
        return export_adapter(ckpt, Path(lora), out, quant)
    quant = quant.lower()
    if quant not in QUANTS:
        raise NimaError(f"unknown GGUF quant {quant!r}", f"choose one of: {', '.join(QUANTS)}")
    if out.suffix != ".gguf":
        raise NimaError(f"--out {out} does not end in .gguf", "name the artifact like model.gguf")
    model, tok = checkpoint.load(ckpt)
    from nima_edge.quantization import load_quant  # late: pulls in the quantization core
    result = load_quant(ckpt)
    meta = checkpoint.read_meta(ckpt)
    name = meta.get("preset") or meta.get("name") or "nima"  # not the path: same inputs, same bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    extra: dict = {"tokenizer": tok.kind, "chat_template": "embedded (tokenizer.chat_template)"}
    # The artifact and its manifest are swapped in together (publish_file), never one without the other.
    with temp_file(out) as tmp:
        if quant in DIRECT:
            used = _check_result(result, quant)
            write_gguf(tmp, model, tok, quant, used, name)
            extra["weights"] = _weights_note(quant, result, used)
        else:
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.nima-", suffix=".tmp") as scratch:
                f32 = Path(scratch) / "f32.gguf"
                write_gguf(f32, model, tok, "f32", None, name)
                extra["fallbacks"] = llama_quantize(f32, tmp, quant, threads)
            extra["weights"] = (f"llama.cpp's quantizer ({quant}) from the float weights"
                                + ("; the checkpoint's quantization result is not used" if result else ""))
            if extra["fallbacks"]:
                kinds = Counter(f"{f['wanted']}->{f['used']}" for f in extra["fallbacks"])
                # ours to say, not a library's log line: printed even when the CLI silences logging
                print(f"note: llama.cpp stored {len(extra['fallbacks'])} tensor(s) in a fallback type ("
                      + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))
                      + "; the width is not a multiple of the type's block); each is listed in the manifest",
                      file=sys.stderr)
        extra["tensor_types"] = tensor_types(tmp)
        publish_file(tmp, out, "gguf", quant, ckpt, gguf=extra)
    return out


def _check_result(result: dict | None, quant: str) -> dict | None:
    """The quantization result to pack for `quant`, or None to quantize with gguf-py / write floats."""
    if result is None or quant not in RESULT_BITS:
        return None
    for name, q in result.items():
        if q.bits != RESULT_BITS[quant]:
            want = {4: "q4_0", 8: "q8_0"}[q.bits]
            raise NimaError(f"the checkpoint holds a {q.bits}-bit quantization result but --quant {quant} "
                            f"needs {RESULT_BITS[quant]}-bit", f"export with --quant {want}, or re-quantize with "
                            f"--bits {RESULT_BITS[quant]}")
        if not q.symmetric:
            raise NimaError(f"{name} is quantized asymmetrically; GGUF {quant.upper()} blocks hold one symmetric "
                            "scale", "re-run nima-edge quantize with symmetric scales (the default)")
    return result


def _weights_note(quant: str, result: dict | None, used: dict | None) -> str:
    if used:
        methods = sorted({q.method for q in used.values()})
        return f"decoder linears packed from the checkpoint's {'/'.join(methods)} result"
    if quant in RESULT_BITS:
        return "decoder linears rounded to nearest by gguf-py's quantizer (no quantization result in the checkpoint)"
    return f"float weights ({quant})" + ("; the checkpoint's quantization result is not used" if result else "")


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order taking a Q/K projection from HF's rotate_half RoPE layout to llama.cpp's interleaved one.

    The same permutation as llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), expressed as row
    indices so it applies alike to float weights and to quantized codes and scales.
    """
    rows = np.arange(n_rows)
    return rows.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)




def add_rope_scaling(w: gguf.GGUFWriter, cfg) -> np.ndarray | None:
    """Rope scaling as llama.cpp reads it: linear as keys; llama3 as the per-frequency `rope_freqs` factors
    convert_hf_to_gguf.py computes (returned, to be written as a tensor)."""
    hf = cfg.to_hf()
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    if kind == "llama3":
        from nima_edge.model import rope_factors
        return rope_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).numpy()
    raise NimaError(f"rope scaling {kind!r} has no GGUF export in nima-edge (linear and llama3 do)",
                    "export this model to onnx, onnx-portable or executorch")


def write_gguf(path: Path, model, tok, quant: str, result: dict | None, name: str) -> None:
    cfg = model.config
    linear_type, file_type = DIRECT[quant]
    float_type = Q.F32 if quant == "f32" else Q.F16  # embeddings/head stay float (not in the quant result)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    w = Writer(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp assumes width / heads otherwise
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    rope_factors = add_rope_scaling(w, cfg)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    add_tokenizer(w, tok, cfg.vocab_size)

    if rope_factors is not None:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors)
    # tied embeddings: state_dict_for_save drops lm_head, so no `output` tensor and llama.cpp reuses token_embd
    for hf_name, t in checkpoint.state_dict_for_save(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise NimaError(f"no GGUF name for tensor {hf_name}", "the checkpoint is not a plain Llama model")
        data = t.detach().to(torch.float32).numpy()
        order = None
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            order = permute_rows(data.shape[0], heads)
            data = data[order]
        if data.ndim == 1:
            w.add_tensor(name, data)  # norms: always F32
        elif hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            w.add_tensor(name, data.astype(np.float16) if float_type == Q.F16 else data)
        elif linear_type == Q.F32:
            w.add_tensor(name, data)
        elif linear_type == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        elif result is not None and hf_name in result:
            q = result[hf_name]
            if order is not None:
                q = type(q)(codes=q.codes[order], scales=q.scales[order], zeros=q.zeros[order], bits=q.bits,
                            group_size=q.group_size, symmetric=q.symmetric, method=q.method)
            w.add_tensor(name, pack_gguf(q), raw_dtype=linear_type)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, linear_type), raw_dtype=linear_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# llama.cpp logs e.g. "warning: blk.0.attn_k.weight - ncols 128 not divisible by 256 (required for type q4_K)"
# then "-> falling back to q5_0" when a tensor's width does not fit the requested type's super-block
FALLBACK = re.compile(r"warning: (?P<tensor>\S+)\s+- (?P<reason>.*?\(required for type\s+(?P<wanted>\w+)\))"
                      r"\s*-> falling back to\s+(?P<used>\w+)")


def llama_quantize(src: Path, dst: Path, quant: str, threads: int | None) -> list[dict]:
    """Quantize an F32 GGUF with llama.cpp; returns the per-tensor fallbacks it made."""
    import llama_cpp
    from llama_cpp import _logger  # llama-cpp-python's log callback, restored afterwards

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, _user):
        lines.append(text.decode("utf-8", errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = threads or 0
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    text = "".join(lines)
    if rc != 0:
        raise NimaError(f"llama.cpp could not quantize to {quant}:\n{text.strip()[-800:]}",
                        "pick another --quant (see nima-edge export --help)")
    return [{"tensor": m["tensor"], "wanted": m["wanted"], "used": m["used"], "reason": " ".join(m["reason"].split())}
            for m in FALLBACK.finditer(text)]


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
