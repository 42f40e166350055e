"""Quantization and one exporter per target (nima_edge.export once installed).

Each exporter module has `export(ckpt, out, quant, **options) -> Path`: it writes the artifact at
`out` and its manifest (nima_edge.manifest.write_manifest) and returns the artifact path.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from nima_edge.errors import NimaError

# target -> "module:function", imported only when used (each pulls in a heavy toolchain)
EXPORTERS: dict[str, str] = {
    "executorch": "nima_edge.export.executorch:export",
    "gguf": "nima_edge.export.gguf:export",
    "onnx": "nima_edge.export.onnx:export",
    "onnx-portable": "nima_edge.export.onnx_portable:export",
    "tensorrt": "nima_edge.export.tensorrt:export",
}


def export(ckpt: str | Path, target: str, out: str | Path, quant: str, **options) -> Path:
    if target not in EXPORTERS:
        raise NimaError(f"unknown export target {target!r}",
                        f"choose one of: {', '.join(EXPORTERS) or '(none registered)'}")
    module, fn = EXPORTERS[target].split(":")
    return getattr(importlib.import_module(module), fn)(Path(ckpt), Path(out), quant, **options)
