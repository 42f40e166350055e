"""Runtime adapters, one module per target (runtimes/<target>.py), plus each target's format module
(runtimes/<target>_format.py) that its exporter imports. Which class serves which target is said once,
in the registry (nima_edge/targets.py).

Import rule: nothing here imports export/ or train/, and only the torch and executorch runtimes import
torch, so a device that only runs models needs none of the export toolchain.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from nima_edge.runtime import Runtime


def detect_target(path: str | Path) -> str:
    """Which runtime reads this artifact: its manifest says so, else its file type does."""
    from nima_edge import targets  # late: the registry imports this package's format modules
    return targets.detect(path)


def load_runtime(path: str | Path, target: str | None = None, *, allow_custom_ops: bool = False,
                 **options) -> Runtime:
    """The runtime for `path`. allow_custom_ops lets an artifact load native libraries its own config names
    (ONNX GenAI's custom_ops_library): off by default, since an artifact is data; runtimes that never load
    such code ignore it."""
    from nima_edge import targets
    target = target or targets.detect(path)
    cls = targets.get(target).load("runtime")
    if allow_custom_ops and "allow_custom_ops" in inspect.signature(cls).parameters:
        options["allow_custom_ops"] = True
    return cls(path, **options)
