"""Quantization and one exporter per target (nima_edge.export once installed).

Each exporter module has `export(ckpt, out, quant, **options) -> Path`: it writes the artifact at
`out` and its manifest (nima_edge.manifest.write_manifest) and returns the artifact path. Which module
serves which target is said once, in the registry (nima_edge/targets.py).
"""
from __future__ import annotations

from pathlib import Path

from nima_edge import targets


def export(ckpt: str | Path, target: str, out: str | Path, quant: str, **options) -> Path:
    # each exporter refuses schemes outside its registry entry, in its own words
    return targets.get(target, "exporter").load("exporter")(Path(ckpt), Path(out), quant, **options)
