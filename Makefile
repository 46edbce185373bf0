# Every target creates/refreshes .venv and installs the project before running.
#   make demo   synthesise the embedded data set (with a preview montage)
#   make test   lint + the whole test suite (what CI runs)
#   make bench  benchmarks (ratios against a baseline measured in the same run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first when the environment has no torch, so a CPU machine does not
# pull a multi-GB CUDA build. A torch already importable by $(PYTHON) (e.g. your CUDA build) is kept: the
# venv is then created with --system-site-packages and sees it.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= data/synthetic

.PHONY: install demo test lint bench clean

$(BIN)/python:
	if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "installing the CPU build of torch"; \
		$(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)+cpu" \
		|| $(BIN)/python -m pip install -q torch --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/seqinv synth --out $(DEMO_OUT) --subjects 4 --seed 0 --preview

lint: install
	$(BIN)/ruff check custom tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q -ra --timeout 900

bench: install
	$(BIN)/python benchmarks/simulate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
