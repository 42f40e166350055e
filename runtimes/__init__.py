"""Runtime adapters, one module per target (runtimes/<target>.py), plus each target's format module
(runtimes/<target>_format.py) that its exporter imports. Which class serves which target is said once,
in the registry (nima_edge/targets.py).

Import rule: nothing here imports export/ or train/, and only the torch and executorch runtimes import
torch, so a device that only runs models needs none of the export toolchain.
"""
from __future__ import annotations

from pathlib import Path

from nima_edge.runtime import Runtime


def detect_target(path: str | Path) -> str:
    """Which runtime reads this artifact: its manifest says so, else its file type does."""
    from nima_edge import targets  # late: the registry imports this package's format modules
    return targets.detect(path)


def load_runtime(path: str | Path, target: str | None = None, **options) -> Runtime:
    from nima_edge import targets
    target = target or targets.detect(path)
    return targets.get(target).load("runtime")(path, **options)
