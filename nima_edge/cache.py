"""Where nima-edge keeps what it builds or fetches once, never inside the repository:
$NIMA_EDGE_CACHE, else ~/.cache/nima-edge (peer tools, native loops, the arm64 root, corpora)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("NIMA_EDGE_CACHE", Path.home() / ".cache" / "nima-edge"))
