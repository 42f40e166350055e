"""Runtime adapters by target name. A new target adds one entry here and one module beside it."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime

# target -> "module:Class", imported only when used (each pulls in a heavy native library)
RUNTIMES: dict[str, str] = {
    "torch": "nima_edge.runtimes.torch_reference:TorchRuntime",
    "executorch": "nima_edge.runtimes.executorch:ExecuTorchRuntime",
    "gguf": "nima_edge.runtimes.gguf:LlamaCppRuntime",
    "onnx": "nima_edge.runtimes.onnx:OnnxGenaiRuntime",
    "onnx-portable": "nima_edge.runtimes.onnx_portable:OnnxPortableRuntime",
    "tensorrt": "nima_edge.runtimes.tensorrt:TensorRTRuntime",
}


def detect_target(path: str | Path) -> str:
    """Which runtime reads this artifact: its manifest says so, else its file type does."""
    path = Path(path)
    if not path.exists():
        raise NimaError(f"artifact {path} does not exist", "check the path; exports are written by nima-edge export")
    manifest = path.with_name(path.name + ".manifest.json") if path.is_file() else path / "manifest.json"
    if manifest.is_file():
        target = json.loads(manifest.read_text()).get("target")
        if target in RUNTIMES:
            return target
    if path.is_dir() and (path / "config.json").is_file():
        return "torch"
    if path.suffix == ".pte" or (path.is_dir() and (path / "model.pte").is_file()):
        return "executorch"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_file() and path.suffix == ".onnx":
        return "onnx-portable"
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "onnx"
    if path.is_dir() and (path / "model.engine").is_file():
        return "tensorrt"
    raise NimaError(f"cannot tell which runtime reads {path}",
                    f"known targets: {', '.join(RUNTIMES)}; pass --target explicitly")


def load_runtime(path: str | Path, target: str | None = None, **options) -> Runtime:
    target = target or detect_target(path)
    if target not in RUNTIMES:
        raise NimaError(f"unknown runtime target {target!r}", f"choose one of: {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[target].split(":")
    return getattr(importlib.import_module(module), cls)(path, **options)
