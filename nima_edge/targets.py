"""The target registry: every target is described once, here, and everything else reads it.

The CLI's choices, the export dispatch, runtime loading and artifact recognition, the pipeline's build
plan, verify's precision classes, manifests' tool versions and the bench profiles' target lists all
come from TARGETS. A new target is one exporter module, one runtime module (plus a small format
module, runtimes/<name>_format.py, for the constants both sides share) and one entry below; a package
outside this repository adds one through the `nima_edge.targets` entry-point group (a function that
returns a Target), without editing anything here.

Nothing here imports torch or a target's toolchain: exporters and runtimes are named as
"module:attribute" strings and imported only when used.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from nima_edge.errors import NimaError
from nima_edge.runtimes import executorch_format, gguf_format, onnx_format, onnx_portable_format, tensorrt_format

# Verify's precision classes (its tolerance table is keyed by these).
FLOAT32, FLOAT16, INT8, INT4 = "float32", "float16", "int8", "int4"


@dataclass(frozen=True)
class Build:
    """One artifact the pipeline makes: a target's quant scheme, from the float weights ("float") or a
    quantization result of the checkpoint ("int4-g32": bits and group size, GPTQ when data is given)."""
    target: str
    quant: str
    weights: str = "float"

    @property
    def filename(self) -> str:
        t = TARGETS[self.target]
        return self.target + "-" + self.quant + ("" if t.marker else t.suffix)  # a folder has no suffix


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str                      # "module:Class" of its nima_edge.runtime.Runtime
    exporter: str | None = None       # "module:function" export(ckpt, out, quant, **options) -> Path
    schemes: dict[str, str] = field(default_factory=dict)  # quant scheme -> verify's precision class
    default_quant: str = "f32"
    modules: tuple[str, ...] = ()     # Python modules this machine needs to export and run it
    distributions: tuple[str, ...] = ()  # pip distributions whose versions its manifests record
    extra: str = ""                   # the pyproject extra that installs them
    suffix: str = ""                  # the suffix of the artifact's file (its main file, for a folder)
    marker: str = ""                  # the file that marks a folder artifact ("" for a file artifact)
    needs_cuda: bool = False
    plan: tuple[tuple[str, str], ...] = ()  # (quant, weights) the pipeline builds ("every target")
    summary: str = ""

    def builds(self) -> list[Build]:
        return [Build(self.name, quant, weights) for quant, weights in self.plan]

    def recognises(self, path: Path) -> bool:
        if path.is_dir():
            return bool(self.marker) and (path / self.marker).is_file()
        return bool(self.suffix) and path.is_file() and path.suffix == self.suffix

    def available(self) -> tuple[bool, str]:
        """Whether this machine can export and run it, and why not."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            hint = f" (pip install 'nima-edge[{self.extra}]')" if self.extra else ""
            return False, f"not installed: {', '.join(missing)}{hint}"
        if self.needs_cuda:
            import torch
            if not torch.cuda.is_available():
                return False, "needs an NVIDIA GPU (CUDA not available)"
        return True, ""

    def load(self, attr: str):
        """Import the exporter or the runtime class, naming the extra to install when it is missing."""
        spec = getattr(self, attr)
        if spec is None:
            raise NimaError(f"target {self.name!r} has no {attr}", f"targets with one: {', '.join(names(attr))}")
        module, name = spec.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in self.modules:  # a missing toolchain, not a bug of ours
                raise NimaError(f"the {self.name} target needs {e.name}, which is not installed",
                                f"pip install 'nima-edge[{self.extra}]'") from e
            raise


_GGUF_DIRECT = {"f32": FLOAT32, "f16": FLOAT16, "q8_0": INT8, "q4_0": INT4}
# Schemes only llama.cpp's quantizer makes (from the f32 file; the IQ1-3 types need an importance
# matrix, so they are left out): held to the float model by verify.
_GGUF_LLAMA = {"bf16": FLOAT16, "q6_k": INT8, "q5_k_m": INT4, "q5_k_s": INT4, "q5_0": INT4, "q5_1": INT4,
               "q4_k_m": INT4, "q4_k_s": INT4, "q4_1": INT4, "q3_k_l": INT4, "q3_k_m": INT4, "q3_k_s": INT4,
               "q2_k": INT4, "iq4_nl": INT4, "iq4_xs": INT4}

_BUILTIN = [
    Target("torch", "nima_edge.runtimes.torch_reference:TorchRuntime", None, {"f32": FLOAT32, "fp32": FLOAT32},
           modules=("torch",), marker="config.json", summary="the PyTorch reference (a checkpoint directory)"),
    Target("gguf", "nima_edge.runtimes.gguf:LlamaCppRuntime", "nima_edge.export.gguf:export",
           {**_GGUF_DIRECT, **_GGUF_LLAMA}, "f32", ("gguf", "llama_cpp"), ("gguf", "llama_cpp_python"), "gguf",
           suffix=gguf_format.SUFFIX,
           plan=(("f32", "float"), ("q8_0", "int8-g32"), ("q4_0", "int4-g32")),
           summary="one .gguf file for llama.cpp"),
    Target("onnx", "nima_edge.runtimes.onnx:OnnxGenaiRuntime", "nima_edge.export.onnx:export",
           {"f32": FLOAT32, "int8": INT8, "int4": INT4}, "f32", ("onnx", "onnxruntime_genai"),
           ("onnx", "onnxruntime", "onnxruntime-genai"), "onnx", marker=onnx_format.GENAI_CONFIG,
           plan=(("f32", "float"), ("int8", "int8-g32"), ("int4", "int4-g32")),
           summary="a folder for ONNX Runtime GenAI"),
    # The portable ONNX's blocked DequantizeLinear wants block 128.
    Target("onnx-portable", "nima_edge.runtimes.onnx_portable:OnnxPortableRuntime",
           "nima_edge.export.onnx_portable:export", {"f32": FLOAT32, "int8": INT8, "int4": INT4}, "f32",
           ("onnx", "onnxruntime"), ("onnx", "onnxruntime"), "onnx", suffix=onnx_portable_format.SUFFIX,
           plan=(("f32", "float"), ("int4", "int4-g128")),
           summary="one .onnx file (optimum's KV naming) for any ONNX Runtime"),
    # XNNPACK has no grouped int8, so 8da8w is re-quantized per channel by torchao from the float weights.
    Target("executorch", "nima_edge.runtimes.executorch:ExecuTorchRuntime", "nima_edge.export.executorch:export",
           {"fp32": FLOAT32, "8da8w": INT8, "8da4w": INT4}, "fp32", ("executorch", "torchao"),
           ("executorch", "torchao"), "executorch", suffix=".pte", marker=executorch_format.PTE_NAME,
           plan=(("fp32", "float"), ("8da8w", "float"), ("8da4w", "int4-g32")),
           summary="a folder with a .pte for ExecuTorch (XNNPACK)"),
    Target("tensorrt", "nima_edge.runtimes.tensorrt:TensorRTRuntime", "nima_edge.export.tensorrt:export",
           {"f32": FLOAT32, "int4": INT4}, "f32", ("tensorrt",), ("tensorrt",), "tensorrt",
           marker=tensorrt_format.ENGINE_FILE, needs_cuda=True, plan=(("f32", "float"),),
           summary="a folder with a TensorRT engine (NVIDIA GPU)"),
]

TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in TARGETS:
        raise NimaError(f"target {target.name!r} is registered twice", "give the new target another name")
    TARGETS[target.name] = target
    return target


for _t in _BUILTIN:
    register(_t)
for _ep in metadata.entry_points(group="nima_edge.targets"):  # targets from other installed packages
    register(_ep.load()())


def names(attr: str = "exporter") -> list[str]:
    """Targets that have an exporter (the `export --target` choices), or a runtime."""
    return [n for n, t in TARGETS.items() if getattr(t, attr)]


def get(name: str, attr: str = "runtime") -> Target:
    if name not in TARGETS or not getattr(TARGETS[name], attr):
        raise NimaError(f"unknown target {name!r}", f"choose one of: {', '.join(names(attr))}")
    return TARGETS[name]


def precision_class(target: str, quant: str) -> str:
    t = get(target)
    if quant.lower() not in t.schemes:
        raise NimaError(f"target {target} has no quant scheme {quant!r}",
                        f"choose one of: {', '.join(t.schemes)}")
    return t.schemes[quant.lower()]


def plan(targets: list[str] | None = None) -> list[Build]:
    """What "every target" means: each target's planned builds, in registry order."""
    return [b for n, t in TARGETS.items() if targets is None or n in targets for b in t.builds()]


def detect(path: str | Path) -> str:
    """Which target an artifact belongs to: its manifest says so, else its file type does."""
    path = Path(path)
    if not path.exists():
        raise NimaError(f"artifact {path} does not exist", "check the path; exports are written by nima-edge export")
    manifest = path / "manifest.json" if path.is_dir() else path.with_name(path.name + ".manifest.json")
    if manifest.is_file():
        try:
            target = json.loads(manifest.read_text()).get("target")
        except (ValueError, AttributeError):
            target = None  # a corrupt manifest: fall back to the file type; verify/bench report it
        if target in TARGETS:
            return target
    for name, t in TARGETS.items():
        if t.recognises(path):
            return name
    raise NimaError(f"cannot tell which runtime reads {path}",
                    f"known targets: {', '.join(TARGETS)}; pass --target explicitly")
