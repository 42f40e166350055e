"""ExecuTorch's forward through its C++ Module instead of the pybind11 bindings (executorch_native.cpp).

Measured on nima-1m (16 + 50 tokens, one thread): the bindings' `Method.execute` costs 50-70 us per
call more than ExecuTorch's own C++ runner spends, 15-25% of a small model's generation; this path
matches the runner (benchmarks/reports/desktop-cpu-peers/README.md). It is compiled once per
(executorch version, source, machine, compiler) against the installed wheel's headers and
libexecutorch.so into the nima-edge cache, then loaded with ctypes. Where it cannot be built (no C++
compiler, a wheel without headers), `library()` says why and the runtime keeps the bindings: the same
numbers, slower per call.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from nima_edge.cache import cache_root
from nima_edge.errors import NimaError

SOURCE = Path(__file__).with_name("executorch_native.cpp")
LIBRARY = "libnima_executorch.so"


def library() -> tuple[Path | None, str]:
    """(the built shared library, "") or (None, why it cannot be built here)."""
    import executorch
    root = Path(next(iter(executorch.__path__)))
    include, lib = root / "include", root / "lib"
    if not (include / "executorch" / "extension" / "module" / "module.h").is_file() or \
            not (lib / "libexecutorch.so").is_file():
        return None, f"the executorch wheel at {root} ships no C++ headers or libexecutorch.so"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return None, "no C++ compiler (apt-get install g++)"
    version = metadata.version("executorch")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), platform.machine().encode(),
                                     cxx.encode()])).hexdigest()[:16]
    out = cache_root() / "native" / f"executorch-{version}-{key}" / LIBRARY
    if out.is_file():
        return out, ""
    tmp = out.with_name(f".{LIBRARY}.{os.getpid()}")  # then renamed: a concurrent build never reads half a file
    # The wheel's CMake config (share/cmake/executorch-config.cmake) asks consumers for C++17 and this define.
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-DC10_USING_CUSTOM_GENERATED_MACROS",
           f"-I{include}", f"-I{include / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}",
           str(SOURCE), f"-L{lib}", "-lexecutorch", f"-Wl,-rpath,{lib}", "-o", str(tmp)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, f"compiling {SOURCE.name} failed: {last}"
        os.replace(tmp, out)
    except OSError as e:  # a read-only or full cache: the bindings still work
        return None, f"cannot build into {out.parent}: {e}"
    finally:
        tmp.unlink(missing_ok=True)
    return out, ""


class NativeForward:
    """forward(tokens, start) -> logits of the last token, for one loaded program."""

    def __init__(self, lib_path: Path, pte: Path, vocab: int):
        lib = ctypes.CDLL(str(lib_path))
        lib.nima_et_open.restype = ctypes.c_void_p
        lib.nima_et_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.nima_et_forward.restype = ctypes.c_int
        lib.nima_et_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.nima_et_close.argtypes = [ctypes.c_void_p]
        self._lib, self._vocab = lib, vocab
        self._err = ctypes.create_string_buffer(512)
        self._handle = lib.nima_et_open(str(pte).encode(), self._err, len(self._err))
        if not self._handle:
            raise NimaError(f"ExecuTorch could not load {pte}: {self._err.value.decode()}",
                            "re-export it: nima-edge export CKPT --target executorch --out DIR")
        self._logits = np.empty(vocab, dtype=np.float32)
        self._start = np.zeros(1, dtype=np.int64)

    def __call__(self, ids: Sequence[int], start: int) -> np.ndarray:
        tokens = np.ascontiguousarray(ids, dtype=np.int64)
        self._start[0] = start
        rc = self._lib.nima_et_forward(self._handle, tokens.ctypes.data, len(tokens), self._start.ctypes.data,
                                       self._logits.ctypes.data, self._vocab, self._err, len(self._err))
        if rc:
            raise NimaError(f"ExecuTorch forward failed: {self._err.value.decode()}",
                            "check the tokens fit the program's context (nima-edge verify ARTIFACT)")
        return self._logits.copy()

    def close(self) -> None:
        if self._handle:
            self._lib.nima_et_close(self._handle)
            self._handle = None

    __del__ = close
