"""ExecuTorch exporter (target "executorch"): a `.pte` lowered to XNNPACK for phones and boards.

The artifact is a directory, so the stock LLM runner finds everything it needs side by side:
    model.pte              forward(tokens[1, T], input_pos[1]) -> logits[1, vocab], static KV cache,
                           llama::update_cache / llama::custom_sdpa, plus the runner's constant
                           metadata methods (get_max_context_len, get_eos_ids, use_kv_cache, ...)
    tokenizer.json         the checkpoint's tokenizer, less a Strip decoder (runner_tokenizer_json)
    tokenizer_config.json  the checkpoint's special tokens and chat template: the runner's HF tokenizer
                           reads BOS/EOS from it. The runner prepends BOS only when asked
                           (GenerationConfig(num_bos=1)); generation_config.json lists the end ids.
    manifest.json

Quantization (torchao, as ExecuTorch's export_llama does it): see export/executorch_quant.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nima_edge import checkpoint
from nima_edge.atomic import atomic_dir
from nima_edge.config import check_context
from nima_edge.errors import NimaError
from nima_edge.manifest import write_manifest
from nima_edge.runtimes.executorch_format import PTE_NAME
from nima_edge.targets import TARGETS

QUANTS = tuple(TARGETS["executorch"].schemes)  # the registry says which schemes exist
ALIASES = {"f32": "fp32"}  # the CLI's generic default name


def metadata(model, tokenizer, max_context: int) -> dict:
    """Constant methods the stock runner reads (executorch/extension/llm/runner/constants.h)."""
    cfg = model.config
    return {
        "get_max_seq_len": max_context,
        "get_max_context_len": max_context,
        "get_n_layers": cfg.num_hidden_layers,
        "get_vocab_size": cfg.vocab_size,
        "get_bos_id": tokenizer.bos_id if tokenizer.bos_id is not None else -1,
        "get_eos_ids": list(tokenizer.eos_ids),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }


def lower(module: torch.nn.Module, max_context: int, constant_methods: dict):
    """torch.export with a dynamic prompt length, lower to XNNPACK, emit the ExecuTorch program."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    example = (torch.tensor([[1, 2, 3]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    dynamic = ({1: torch.export.Dim("token_dim", max=max_context)}, None)
    with torch.no_grad():
        ep = torch.export.export(module, example, dynamic_shapes=dynamic, strict=True)
        ep = ep.run_decompositions({})  # unwraps torchao's quantized tensor subclasses into plain ops
    edge = to_edge_transform_and_lower(
        ep, partitioner=[XnnpackPartitioner()], constant_methods=constant_methods,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    edge = edge.transform([ConvertToLinearPass()])  # any linear left outside XNNPACK runs as one op
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        # the runner owns the input buffers; the KV cache lives in planned mutable buffers
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))


def runner_tokenizer_json(tok) -> str:
    """The checkpoint's tokenizer.json without its Strip decoders (SentencePiece-style ones, e.g. TinyLlama,
    strip the reply's first space). ExecuTorch's runner (pytorch-tokenizers, with executorch 1.5.1) decodes
    one token at a time, so Strip drops the leading space of every piece, and on a lone byte-fallback piece
    (`<0xE2>`, part of a character) its UTF-8 scan throws "invalid character", ending the generation. Without
    it the pieces stream as llama.cpp prints them; a whole decode keeps a leading space it used to strip."""
    spec = json.loads(tok.hf.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Strip":
        spec["decoder"] = None
    elif decoder.get("type") == "Sequence":
        decoder["decoders"] = [d for d in decoder["decoders"] if d.get("type") != "Strip"]
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def export(ckpt: Path, out: Path, quant: str, group_size: int | None = None, log=print, context: int | None = None,
           **_) -> Path:
    """`context`: the KV cache's positions (default: the declared context capped at 2048)."""
    from nima_edge.export.executorch_model import ExecuTorchLlama, load_custom_ops

    quant = ALIASES.get(quant, quant)
    if quant not in QUANTS:
        raise NimaError(f"quant {quant!r} is not an ExecuTorch scheme", f"use --quant {' | '.join(QUANTS)}")
    if Path(out).suffix == ".pte":
        raise NimaError(f"--out {out} names a file, but the ExecuTorch artifact is a directory "
                        f"({PTE_NAME} + tokenizer.json)", "pass a directory path, e.g. --out artifacts/model-et")
    logging.getLogger("executorch").setLevel(logging.WARNING)
    load_custom_ops()
    model, tok = checkpoint.load(ckpt)
    info = {}
    if quant != "fp32":
        from nima_edge.export.executorch_quant import quantize_for_xnnpack
        log(f"quantizing linears ({quant}) with torchao")
        info = quantize_for_xnnpack(model, ckpt, quant, group_size)
    max_context = check_context(model.config, context)
    module = ExecuTorchLlama(model, max_context).eval()
    log("exporting and lowering to XNNPACK")
    program = lower(module, max_context, metadata(model, tok, max_context))
    with atomic_dir(out) as tmp:
        with open(tmp / PTE_NAME, "wb") as f:
            program.write_to_file(f)
        (tmp / "tokenizer.json").write_text(runner_tokenizer_json(tok), encoding="utf-8")
        for name, content in tok.config_files(max_context).items():  # special tokens, end ids, chat template
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        num_bos = int(tok.adds_bos)
        write_manifest(tmp, "executorch", quant, ckpt, model_file=PTE_NAME, backend="xnnpack",  # inside the swap
                       max_context=max_context, runner={"num_bos": num_bos, "note": f"pass num_bos={num_bos}: BOS "
                                                        "is not added by the tokenizer's post-processor in the runner"},
                       quantization=info)
    return Path(out)
