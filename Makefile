# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama.cpp is built portable (AVX2/FMA/F16C, no host-specific AMX path: see runtimes/gguf.py).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: demo test install clean arm-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,test]'
	touch $@

demo: install
	$(BIN)/nima-edge quickstart

test: install
	$(BIN)/pytest -q

# Every device-side artifact kind run on aarch64 under qemu-user against the x86 tokens (root; the first
# run builds the arm64 environment in ~/.cache/nima-edge/arm64, about an hour on two cores):
# benchmarks/arm64_qemu.py, report in benchmarks/reports/arm64-qemu/.
arm-check: install
	$(BIN)/python benchmarks/arm64_qemu.py

clean:
	rm -rf runs artifacts data .pytest_cache
