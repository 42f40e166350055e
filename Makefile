# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama.cpp is built for this CPU's instruction sets (GGML_NATIVE), except that AMX CPUs get an explicit
# AVX-512 set without AMX (its repack path crashes on some Xeons): nima_edge/cpu.py decides.
export CMAKE_ARGS ?= $(shell $(PYTHON) nima_edge/cpu.py --cmake-args)

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
