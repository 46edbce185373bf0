# Every target creates/refreshes .venv and installs the project before running.
#   make demo   CPU-size SeqInv pretraining on the embedded synthetic data, then its invariance probe table
#   make test   lint + the whole test suite (what CI runs)
#   make test-fast  lint + the tests not marked slow (the inner loop)
#   make bench  benchmarks (ratios against a baseline measured in the same run)
#   make weights  CPU-size demo weights (synthetic data, NOT for clinical use) into every bundle's models/
#   make package  dist/<bundle>_v<version>.zip for every bundle with weights, and dist/model_info.json
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first when the environment has no torch, so a CPU machine does not
# pull a multi-GB CUDA build. A torch already importable by $(PYTHON) (e.g. your CUDA build) is kept: the
# venv is then created with --system-site-packages and sees it.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT := data/synthetic

.PHONY: install demo test test-fast lint bench weights package clean

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

PRETRAIN := bundles/seqinv_pretrain/configs
demo: install
	$(BIN)/python -m monai.bundle run training \
		--config_file "['$(PRETRAIN)/train.yaml','$(PRETRAIN)/cpu_small.yaml']"
	$(BIN)/python -m monai.bundle run evaluating \
		--config_file "['$(PRETRAIN)/train.yaml','$(PRETRAIN)/cpu_small.yaml','$(PRETRAIN)/evaluate.yaml']"
	@echo "the probe table above: the demo encoder against random init, position-only and intensity-only"
	@echo "(bundles/seqinv_pretrain/runs/seqinv/probe/probe.md, probe.png)"
	@echo "encoder weights: bundles/seqinv_pretrain/models/model.pt (encoder-only state dict)"
	@echo "synthetic data and its preview: $(DEMO_OUT)/ (seqinv synth --out $(DEMO_OUT) --preview to redraw)"

# Demo weights: the CPU-size SeqInv encoder, then each downstream head on top of it (pretrained_encoder auto
# finds bundles/seqinv_pretrain/models/model.pt). About 2 h on 2 cores; each step resumes if interrupted.
BUNDLE_RUN := $(BIN)/python -m monai.bundle run training --config_file
weights: install
	$(BUNDLE_RUN) "['$(PRETRAIN)/train.yaml','$(PRETRAIN)/cpu_small.yaml']"
	$(BUNDLE_RUN) "['bundles/ixi_tissue_seg/configs/train.yaml','bundles/ixi_tissue_seg/configs/cpu_small.yaml']"
	$(BUNDLE_RUN) "['bundles/arc_lesion_seg/configs/train.yaml','bundles/arc_lesion_seg/configs/cpu_small.yaml']"
	$(BUNDLE_RUN) "['bundles/ixi_denoise/configs/train.yaml','bundles/ixi_denoise/configs/cpu_small.yaml']"
	@echo "demo weights (synthetic data, not for clinical use): bundles/*/models/model.pt"

package: install
	for b in bundles/[!_]*/; do $(BIN)/seqinv package $$b --out dist || exit 1; done
	@echo "zips and their sha256 in dist/model_info.json"

lint: install
	$(BIN)/ruff check custom tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q -ra --timeout 900

# the inner loop: lint, then every test not marked slow (no end-to-end bundle runs); stops at the first failure
test-fast: install lint
	$(BIN)/python -m pytest -q -x -m "not slow" --timeout 300

bench: install
	$(BIN)/python benchmarks/simulate.py
	$(BIN)/python benchmarks/pretrain.py --rounds 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
