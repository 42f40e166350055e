#!/usr/bin/env bash
# Build, once, the arm64 environment `make arm-check` runs the device-side runtimes in (under qemu-user).
# Everything lands in $NIMA_ARM64_CACHE (default ~/.cache/nima-edge/arm64), never in the repository; each
# stage leaves a stamp file and is skipped when its stamp exists (delete the folder to rebuild).
#   rootfs/            Debian bookworm arm64 (debootstrap --variant=minbase): python3.11, libgomp1
#   rootfs/opt/nima/lean   onnxruntime, tokenizers, numpy + llama-cpp-python's pure-Python package and its
#                          deps, and libllama/libggml cross-compiled for aarch64 (no torch, on purpose)
#   rootfs/opt/nima/et     executorch 1.5.1 with the dependencies its aarch64 wheel declares
#   rootfs/opt/nima/torch  torch (CPU, aarch64) and its dependencies
# Wheels are fetched on this x86 host with `pip download --platform ...` (pip under emulation is far
# slower) and unpacked with `pip install --target` (no code runs at install time).
# Needs root (binfmt_misc, debootstrap, chroot) and network access to PyPI and deb.debian.org.
set -euo pipefail

CACHE=${NIMA_ARM64_CACHE:-$HOME/.cache/nima-edge/arm64}
ROOT=$CACHE/rootfs
SUITE=bookworm                      # Raspberry Pi OS 12 is bookworm too: the same python3.11 and glibc 2.36
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Versions: check.py passes the x86 environment's, so both sides run the same releases; the defaults are
# the pyproject extras' pins.
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
EXECUTORCH=${EXECUTORCH_VERSION:-1.5.1}
TORCH=${TORCH_VERSION:-2.13.0}
ORT=${ONNXRUNTIME_VERSION:+==$ONNXRUNTIME_VERSION}
ORT_GENAI=${ONNXRUNTIME_GENAI_VERSION:+==$ONNXRUNTIME_GENAI_VERSION}
TOKENIZERS=${TOKENIZERS_VERSION:+==$TOKENIZERS_VERSION}
PY=${NIMA_HOST_PYTHON:-python3}  # the host Python whose pip fetches wheels
# Cortex-A76 (Raspberry Pi 5) and current phones: Armv8.2-A with dot-product and fp16 arithmetic.
ARM_ARCH=${NIMA_ARM_ARCH:-armv8.2-a+dotprod+fp16}
PIP_AARCH64=(--only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
             --python-version 3.11 --implementation cp)

log() { printf '[arm64-env] %s\n' "$*" >&2; }
done_stage() { [[ -e $CACHE/.stamp-$1 ]]; }
mark() { touch "$CACHE/.stamp-$1"; }
mkdir -p "$CACHE"

[[ $(id -u) == 0 ]] || { echo "error: building the arm64 environment needs root (binfmt_misc, debootstrap, chroot)" >&2
                         echo "  fix: run make arm-check as root (or in a container where you are root)" >&2; exit 2; }

# 1. Host tools and the qemu-aarch64 binfmt handler (F flag: the interpreter is opened now, so it also
#    works inside the chroot).
need=()
for pair in qemu-aarch64-static:qemu-user-static debootstrap:debootstrap aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
            aarch64-linux-gnu-g++:g++-aarch64-linux-gnu cmake:cmake ninja:ninja-build; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  log "apt-get install ${need[*]}"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
BINFMT=/proc/sys/fs/binfmt_misc
[[ -e $BINFMT/register ]] || mount -t binfmt_misc binfmt_misc "$BINFMT"
if [[ ! -e $BINFMT/qemu-aarch64 ]]; then
  log "registering qemu-aarch64 with binfmt_misc"
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register"
fi

# 2. The arm64 Debian root (the second stage runs under qemu: ~10-20 min on two busy cores).
if ! done_stage rootfs; then
  log "debootstrap $SUITE arm64 -> $ROOT (slow: emulated)"
  rm -rf "$ROOT.tmp"
  debootstrap --arch=arm64 --variant=minbase --include=python3,libgomp1 "$SUITE" "$ROOT.tmp" "$MIRROR" \
    > "$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
  mark rootfs
fi

# 3. llama.cpp for aarch64, cross-compiled from the llama.cpp vendored in the llama-cpp-python sdist, and
#    that sdist's pure-Python llama_cpp package (it loads libllama.so from $LLAMA_CPP_LIB_PATH).
if ! done_stage llama; then
  src=$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON
  if [[ ! -d $src ]]; then
    log "fetching the llama-cpp-python $LLAMA_CPP_PYTHON sdist"
    "$PY" -m pip download -q --no-deps --no-binary=:all: --dest "$CACHE/src" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar -xzf "$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$CACHE/src"
  fi
  log "cross-compiling libllama/libggml for aarch64 ($ARM_ARCH)"
  cmake -S "$src/vendor/llama.cpp" -B "$CACHE/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$ARM_ARCH" -DGGML_OPENMP=ON \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' > "$CACHE/llama-build.log" 2>&1
  cmake --build "$CACHE/llama-build" --target llama -j "$(nproc)" >> "$CACHE/llama-build.log" 2>&1 \
    || { tail -30 "$CACHE/llama-build.log" >&2; exit 1; }
  lib=$ROOT/opt/nima/llama-lib
  rm -rf "$lib" && mkdir -p "$lib"
  find "$CACHE/llama-build/bin" "$CACHE/llama-build" -maxdepth 3 -name 'lib*.so*' -exec cp -P {} "$lib/" \; 2>/dev/null
  mkdir -p "$ROOT/opt/nima/lean" && rm -rf "$ROOT/opt/nima/lean/llama_cpp"
  cp -r "$src/llama_cpp" "$ROOT/opt/nima/lean/llama_cpp"
  mark llama
fi

# 4. aarch64 wheels, fetched here. pip evaluates dependency markers for this x86 host, so a package
#    whose requirements differ by machine (executorch: coremltools and scikit-learn "on x86_64 only") is
#    fetched without dependencies and its aarch64 requirements are read from its own metadata.
fetch() {  # fetch DIR [pip args...]
  local dir=$CACHE/wheels-$1; shift
  mkdir -p "$dir"
  "$PY" -m pip download --disable-pip-version-check -q --dest "$dir" --find-links "$dir" "${PIP_AARCH64[@]}" "$@" 2> "$CACHE/pip.err" \
    || { grep -v '^WARNING: Location' "$CACHE/pip.err" >&2; return 1; }
}
missing_from_index() {  # one line per requirement the index cannot provide (pip names only the first)
  local req extra extras
  for req in "$@"; do
    if [[ $req =~ ^([^][]+)\[([^]]+)\](.*)$ ]]; then  # cuda-toolkit[cublas,...]: each extra on its own
      IFS=, read -ra extras <<< "${BASH_REMATCH[2]}"
      for extra in "${extras[@]}"; do probe_index "${BASH_REMATCH[1]}[$extra]${BASH_REMATCH[3]}"; done
    else
      probe_index "$req"
    fi
  done
}
probe_index() {  # resolve one requirement for aarch64 without installing it; print pip's reason if it fails
  "$PY" -m pip install --dry-run --ignore-installed --target "$CACHE/dry-run" -q --disable-pip-version-check \
    "${PIP_AARCH64[@]}" "$1" > /dev/null 2> "$CACHE/pip.err" \
    || grep -m1 '^ERROR: No matching distribution' "$CACHE/pip.err" || grep -m1 '^ERROR' "$CACHE/pip.err" || true
}
if ! done_stage wheels; then
  log "fetching aarch64 wheels"
  rm -rf "$CACHE"/wheels-{lean,et,torch} "$ROOT/opt/nima/torch.UNAVAILABLE"
  fetch lean "onnxruntime$ORT" "tokenizers$TOKENIZERS" numpy
  fetch lean --no-deps "onnxruntime-genai$ORT_GENAI" || log "no onnxruntime-genai wheel for aarch64"
  # llama-cpp-python's own requirements (its pure-Python package is taken from the sdist above)
  fetch lean numpy typing-extensions diskcache jinja2
  fetch et --no-deps "executorch==$EXECUTORCH"
  # executorch -> hydra-core -> antlr4-python3-runtime 4.9.3 exists only as an sdist (pure Python): pip on
  # a board builds it; here it is built into a wheel so the --platform fetch can use it.
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --wheel-dir "$CACHE/wheels-et" \
    "antlr4-python3-runtime==4.9.3" 2> "$CACHE/pip.err" || { grep -v '^WARNING: Location' "$CACHE/pip.err" >&2; exit 1; }
  mapfile -t et_deps < <("$PY" "$(dirname "$0")/aarch64_requires.py" "$CACHE"/wheels-et/executorch-"$EXECUTORCH"-*.whl)
  fetch et "${et_deps[@]}"
  # torch's aarch64 wheel on PyPI is the CUDA build: it needs the CUDA runtime libraries even to import.
  # When the index cannot provide them, record pip's reason and fetch the rest (the import then fails,
  # and the check reports the ExecuTorch artifacts as not run, with that reason).
  fetch torch --no-deps "torch==$TORCH"
  mapfile -t torch_deps < <("$PY" "$(dirname "$0")/aarch64_requires.py" "$CACHE"/wheels-torch/torch-"$TORCH"-*.whl)
  if ! fetch torch "${torch_deps[@]}"; then
    mkdir -p "$ROOT/opt/nima"
    missing_from_index "${torch_deps[@]}" > "$ROOT/opt/nima/torch.UNAVAILABLE"
    log "torch $TORCH for aarch64 cannot be completed from this package index: $(cat "$ROOT/opt/nima/torch.UNAVAILABLE")"
    mapfile -t cpu_deps < <(printf '%s\n' "${torch_deps[@]}" | grep -Ev '^(nvidia-|cuda-|triton)')
    fetch torch "${cpu_deps[@]}"
  fi
  ls "$CACHE"/wheels-lean/onnxruntime-[0-9]*.whl "$CACHE"/wheels-et/executorch-*.whl "$CACHE"/wheels-torch/torch-*.whl >/dev/null
  mark wheels
fi

# 5. Unpack them into three separate site folders inside the root (no code runs at install time).
if ! done_stage sites; then
  for site in lean et torch; do
    log "installing the $site wheels into /opt/nima/$site"
    target=$ROOT/opt/nima/$site
    mkdir -p "$target" && find "$target" -mindepth 1 -maxdepth 1 ! -name llama_cpp -exec rm -rf {} +
    "$PY" -m pip install -q --no-deps --no-index --upgrade --target "$target" "${PIP_AARCH64[@]}" \
      "$CACHE"/wheels-$site/*.whl 2> "$CACHE/pip.err" || { grep -v '^WARNING: Location' "$CACHE/pip.err" >&2; exit 1; }
  done
  test -d "$ROOT/opt/nima/lean/onnxruntime" && test -d "$ROOT/opt/nima/et/executorch" && test -d "$ROOT/opt/nima/torch/torch"
  mark sites
fi
log "ready: $ROOT"
