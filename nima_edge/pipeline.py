"""Build, verify and bench every artifact of a checkpoint: shared by `nima-edge quickstart` and the
benchmark suite (benchmarks/suite.py).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from nima_edge.errors import NimaError

# Which Python modules a target needs on this machine (TensorRT also needs a CUDA GPU).
TARGET_MODULES = {
    "gguf": ["gguf", "llama_cpp"],
    "onnx": ["onnx", "onnxruntime_genai"],
    "onnx-portable": ["onnx", "onnxruntime"],
    "executorch": ["executorch", "torchao"],
    "tensorrt": ["tensorrt"],
}


def target_available(target: str) -> tuple[bool, str]:
    missing = [m for m in TARGET_MODULES[target] if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"not installed: {', '.join(missing)}"
    if target == "tensorrt":
        import torch
        if not torch.cuda.is_available():
            return False, "needs an NVIDIA GPU (CUDA not available)"
    return True, ""


@dataclass(frozen=True)
class Build:
    target: str
    quant: str
    weights: str  # "float" or a quantization of the checkpoint: "int4-g32", "int8-g32", "int4-g128"

    @property
    def filename(self) -> str:
        suffix = {"gguf": ".gguf", "onnx-portable": ".onnx"}.get(self.target, "")  # others are folders
        return f"{self.target}-{self.quant}{suffix}"


# What "every target" means: each flavour at float precision and at the quantizations it packs
# from our GPTQ result (block 32; the portable ONNX's DequantizeLinear wants block 128). ExecuTorch's
# 8da8w is per-channel (XNNPACK has no grouped int8), so torchao quantizes it from the float weights.
PLAN = [
    Build("gguf", "f32", "float"), Build("gguf", "q8_0", "int8-g32"), Build("gguf", "q4_0", "int4-g32"),
    Build("onnx", "f32", "float"), Build("onnx", "int8", "int8-g32"), Build("onnx", "int4", "int4-g32"),
    Build("onnx-portable", "f32", "float"), Build("onnx-portable", "int4", "int4-g128"),
    Build("executorch", "fp32", "float"), Build("executorch", "8da8w", "float"),
    Build("executorch", "8da4w", "int4-g32"),
    Build("tensorrt", "f32", "float"),
]


def quantized_checkpoint(ckpt: Path, weights: str, data_dir: Path | None, work: Path) -> Path:
    """The float checkpoint itself, or a GPTQ-quantized copy of it (made once, reused)."""
    if weights == "float":
        return ckpt
    from nima_edge.export.quantize import quantize_checkpoint
    bits, group = weights.removeprefix("int").split("-g")
    out = work / f"{ckpt.name}-{weights}"
    if not (out / "quantization.json").is_file():
        method = "gptq" if data_dir is not None else "rtn"
        quantize_checkpoint(ckpt, out, bits=int(bits), group_size=int(group), method=method, data_dir=data_dir)
    return out


def build_all(ckpt: Path, out_dir: Path, data_dir: Path | None, plan=PLAN, log=print,
              prefix: str = "") -> tuple[list[Path], list[str]]:
    """Export every planned artifact whose target is available, named `prefix` + target-quant;
    returns (artifacts, skipped reasons)."""
    from nima_edge.export import export
    artifacts, skipped = [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    for b in plan:
        ok, why = target_available(b.target)
        if not ok:
            skipped.append(f"{b.target} {b.quant}: {why}")
            continue
        src = quantized_checkpoint(ckpt, b.weights, data_dir, out_dir)
        log(f"export {b.target} {b.quant} <- {src.name}")
        try:
            artifacts.append(export(src, b.target, out_dir / (prefix + b.filename), b.quant))
        except NimaError as e:
            skipped.append(f"{b.target} {b.quant}: {e.problem}")
    return artifacts, skipped


def verify_all(artifacts: list[Path], data_dir: Path | None, log=print) -> dict[str, dict]:
    from nima_edge.verify import verify_artifact
    reports = {}
    for path in artifacts:
        log(f"verify {path.name}")
        reports[path.name] = verify_artifact(path, data_dir=data_dir)
    return reports
