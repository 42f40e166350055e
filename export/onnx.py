"""Target "onnx": the fast CPU path, a directory that ONNX Runtime GenAI's Generator runs.

ONNX Runtime GenAI's own model builder writes the graph from our HF checkpoint (fp32, fused
GroupQueryAttention with rotary, SkipSimplifiedLayerNorm, genai_config.json, tokenizer files). For
int8/int4 we then replace each decoder MatMul with MatMulNBits holding *our* quantization result,
packed exactly, rather than letting the builder re-quantize: every target runs the same numbers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nima_edge import checkpoint
from nima_edge.atomic import atomic_dir
from nima_edge.errors import NimaError
from nima_edge.export.onnx_weights import concat_rows, plan_substitutions, quant_result, set_nodes
from nima_edge.export.packing import pack_matmul_nbits
from nima_edge.quantization import QuantizedWeight
from nima_edge.manifest import write_manifest
from nima_edge.runtimes.onnx_format import DATA_FILE, GENAI_CONFIG, MODEL_FILE

TARGET = "onnx"
DEFAULT_GROUP = 32
# MatMulNBits accuracy_level: 4 quantizes activations to int8 per block (the builder's CPU default and
# the fastest kernel); 1 keeps fp32 activations and reproduces the fake-quant reference to ~1e-6.
DEFAULT_ACCURACY_LEVEL = 4

# builder weight name -> the HF weights it holds (q|k|v are fused into one projection)
_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+_proj)\.MatMul\.weight")
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


# The builder writes the graph our MatMulNBits swap and the tests were checked against: one version.
BUILDER_VERSION = "0.18.0"
# What the builder reads from the checkpoint through transformers; none may name code to import.
_CONFIGS = ("config.json", "tokenizer_config.json", "generation_config.json")


def refuse_remote_code(ckpt: Path) -> None:
    """A checkpoint is data: a config that names its own Python classes (auto_map) is refused, so
    nothing shipped inside a checkpoint can run during export."""
    for name in _CONFIGS:
        path = ckpt / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NimaError(f"{path} is not valid JSON ({e})", "re-save the checkpoint") from e
        if isinstance(cfg, dict) and "auto_map" in cfg:
            raise NimaError(f"{path} has an auto_map (custom model code shipped with the checkpoint); nima-edge "
                            "never runs code from a checkpoint", "remove auto_map: our models are plain "
                            "LlamaForCausalLM checkpoints and need no custom code")


def _check_builder_version() -> None:
    from importlib import metadata
    have = metadata.version("onnxruntime-genai")
    if have != BUILDER_VERSION:
        raise NimaError(f"onnxruntime-genai {have} is installed; the onnx target's builder is pinned to "
                        f"{BUILDER_VERSION}", "pip install -e '.[onnx]' (it pins the tested version)")


def run_builder(ckpt: Path, out: Path) -> None:
    """onnxruntime-genai's model builder, fp32 for the CPU execution provider, in a child process
    (it imports its own module tree and prints a lot). Remote code and the Hugging Face hub are off:
    it reads the local checkpoint's files as data only."""
    refuse_remote_code(ckpt)
    _check_builder_version()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="ortgenai-cache-") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", cache, "--extra_options", "hf_remote=false", "hf_token=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise NimaError(f"onnxruntime-genai's model builder failed on {ckpt}:\n{tail}",
                        "check that the checkpoint loads (nima-edge model info) and that onnxruntime-genai "
                        "is installed: pip install 'nima-edge[onnx]'")


def hf_names(builder_name: str) -> list[str] | None:
    m = _WEIGHT.fullmatch(builder_name)
    if m is None:
        return None
    layer, block, proj = m.groups()
    prefix = f"model.layers.{layer}.{_HF_MODULE[block]}."
    projs = ["q_proj", "k_proj", "v_proj"] if proj == "qkv_proj" else [proj]
    return [f"{prefix}{p}.weight" for p in projs]


def to_matmulnbits(proto: onnx.ModelProto, qweights: dict[str, QuantizedWeight], float_sd: dict,
                   accuracy_level: int) -> int:
    """Replace every MatMul whose weight is quantized by a MatMulNBits of our packed codes; returns the count.

    Before replacing, the builder's float weight must equal our float weights (transposed, fused), so a
    wrong name mapping can never slip through.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, replaced, count = [], set(), 0
    for node in graph.node:
        names = hf_names(node.input[1]) if node.op_type == "MatMul" else None
        if not names or not all(n in qweights for n in names):
            nodes.append(node)
            continue
        expected = np.concatenate([float_sd[n].numpy() for n in names]).T
        if not np.array_equal(numpy_helper.to_array(inits[node.input[1]]), expected):
            raise RuntimeError(f"builder weight {node.input[1]} is not {names}; the name mapping is out of date")
        q = concat_rows([qweights[n] for n in names])
        B, scales, zero_points = pack_matmul_nbits(q)
        base = node.input[1].removesuffix(".weight")
        inputs = [node.input[0]]
        for key, value in (("B", B), ("scales", scales), ("zero_points", zero_points)):
            if value is not None:  # symmetric: the operator's default zero point 2**(bits-1) is ours
                graph.initializer.append(numpy_helper.from_array(value.reshape(-1) if key == "zero_points"
                                                                 else value, f"{base}.{key}"))
                inputs.append(f"{base}.{key}")
        n_out, k = q.shape
        nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name + "NBits",
                                      domain="com.microsoft", K=k, N=n_out, bits=q.bits,
                                      block_size=q.group_size, accuracy_level=accuracy_level))
        replaced.update(names)
        count += 1
    if missing := set(qweights) - replaced:
        raise RuntimeError(f"the builder's graph has no MatMul for {sorted(missing)[:3]}")
    set_nodes(graph, nodes)
    return count


def check_loads(path: Path) -> None:
    """onnx.checker rejects the builder's graph (it puts ORT's SimplifiedLayerNormalization in the default
    domain), so the check is ONNX Runtime's own: building a session validates every node, type and shape."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export(ckpt: Path, out: Path, quant: str = "f32", group_size: int = DEFAULT_GROUP,
           accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> Path:
    model, tok = checkpoint.load(ckpt)
    qweights = quant_result(ckpt, model, quant, TARGET, group_size)
    float_sd = {k: v.detach() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        run_builder(ckpt, tmp)
        # the builder copies the tokenizer files (specials, chat template) but not generation_config.json,
        # which lists every id that ends a reply (Llama-3: <|eot_id|> and <|end_of_text|>)
        generation = tok.config_files()["generation_config.json"]
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        extra = {}
        if qweights:
            proto = onnx.load(str(tmp / MODEL_FILE))  # pulls model.onnx.data in
            count = to_matmulnbits(proto, qweights, float_sd, accuracy_level)
            (tmp / DATA_FILE).unlink()
            onnx.save_model(proto, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE)
            first = next(iter(qweights.values()))
            extra = {"matmulnbits": {"nodes": count, "bits": first.bits, "block_size": first.group_size,
                                     "symmetric": first.symmetric, "method": first.method,
                                     "accuracy_level": accuracy_level},
                     "substitutions": plan_substitutions(ckpt, model, qweights, group_size)}
        check_loads(tmp / MODEL_FILE)
        genai = json.loads((tmp / GENAI_CONFIG).read_text())
        write_manifest(tmp, TARGET, quant, ckpt, builder="onnxruntime_genai.models.builder fp32 cpu",
                       context_length=genai["model"]["context_length"], **extra)
    return out
