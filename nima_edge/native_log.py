"""Native libraries that print to the process's stderr on their own (ExecuTorch's C++ log while its
threadpool starts: cpuinfo's probing of /sys, "Resetting threadpool ...") are muted for that moment
when the CLI is quiet (`nima-edge` without --verbose sets QUIET); library use is left untouched."""
from __future__ import annotations

import contextlib
import os
import sys

QUIET = False


@contextlib.contextmanager
def muted_stderr():
    """While QUIET, point file descriptor 2 at /dev/null for the block (C++ writes bypass sys.stderr)."""
    if not QUIET:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
