"""The manifest beside every artifact: what it is, where it came from, and what was measured on it.

A file artifact `model.gguf` gets `model.gguf.manifest.json`; a directory artifact gets
`manifest.json` inside it. No timestamps: the same inputs give the same bytes.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from nima_edge.atomic import sha256_file, write_text
from nima_edge.errors import NimaError

TOOLS = ("nima-edge", "torch", "safetensors", "tokenizers", "gguf", "llama_cpp_python", "onnx", "onnxruntime",
         "onnxruntime-genai", "executorch", "torchao", "tensorrt")


def manifest_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact / "manifest.json" if artifact.is_dir() else artifact.with_name(artifact.name + ".manifest.json")


def tool_versions(names=TOOLS) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe_files(artifact: Path) -> list[dict]:
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != "manifest.json") \
        if artifact.is_dir() else [artifact]
    base = artifact if artifact.is_dir() else artifact.parent
    return [{"name": str(p.relative_to(base)), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def write_manifest(artifact: str | Path, target: str, quant: str, source_ckpt: str | Path, **extra) -> Path:
    from nima_edge.checkpoint import checkpoint_hash  # late: checkpoint imports torch
    artifact = Path(artifact)
    manifest = {
        "target": target,
        "quant": quant,
        "source": {"checkpoint": str(Path(source_ckpt).resolve()), "sha256": checkpoint_hash(source_ckpt)},
        "files": describe_files(artifact),
        "tools": tool_versions(),
        **extra,
    }
    path = manifest_path(artifact)
    write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(artifact: str | Path) -> dict:
    path = manifest_path(artifact)
    if not path.is_file():
        raise NimaError(f"{artifact} has no manifest ({path.name})", "re-export it with nima-edge export")
    return json.loads(path.read_text())


def update_manifest(artifact: str | Path, key: str, value) -> None:
    """Merge a measurement (e.g. `verify`, `bench`) into an existing manifest."""
    manifest = read_manifest(artifact)
    manifest[key] = value
    write_text(manifest_path(artifact), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
