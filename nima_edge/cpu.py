"""What this CPU can do, read from the OS (stdlib only: the Makefile runs it before the venv exists).

    python3 nima_edge/cpu.py --cmake-args    # the llama.cpp build flags for this machine

llama.cpp is built for the host's instruction sets (GGML_NATIVE) except on CPUs with AMX: there
-march=native compiles ggml's AMX path in, and quantized models crash in its AMX/repack buffer types
on some Xeons, so those get an explicit AVX-512 set without AMX (and the runtime keeps the extra
buffer types off: runtimes/gguf.py).
"""
from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return frozenset()
    for line in info.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64
            return frozenset(value.split())
    return frozenset()


def has_amx() -> bool:
    return "amx_tile" in cpu_flags()


def llama_cpp_cmake_args() -> str:
    """CMake flags for llama.cpp on this machine (llama-cpp-python's CMAKE_ARGS, and llama-bench's)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not has_amx():
        return "-DGGML_NATIVE=ON"
    flags = cpu_flags()
    wanted = {"GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512_vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
              "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}
    on = [f"-D{opt}=ON" for opt, flag in wanted.items() if flag in flags]
    return " ".join(["-DGGML_NATIVE=OFF", *on, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--cmake-args"]:
        print(llama_cpp_cmake_args())
    else:
        print(" ".join(sorted(cpu_flags())))
