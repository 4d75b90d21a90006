# Every target does its own set-up on a fresh clone.
#   make demo   the whole stack on the embedded synthetic data set, on CPU
#   make test   the CPU test suite (creates .venv first)
#   make lint   ruff
# TORCH_SPEC pins torch for this CPU machine; on a GPU box pass the build you want, e.g.
#   make setup TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= datasets/demo
# Tests and the demo never reach for the network.
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-data demo-clip demo-prior test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: demo-data demo-clip demo-prior
	@echo "demo: done. Data in $(DEMO_DIR)/, runs in runs/demo-*/ (metrics.jsonl, samples/, export/)."

# The demo's scenes: the synthetic set's "simple" preset, written once (reruns skip finished shards).
demo-data: setup
	$(PY) -m data.synthetic --out $(DEMO_DIR)/train --split train --preset simple --num-samples 20000 \
	    --resolution 64 --workers 2 --contact-sheet $(DEMO_DIR)/train_contact_sheet.png
	$(PY) -m data.synthetic --out $(DEMO_DIR)/heldout --split heldout --preset simple --num-samples 1000 \
	    --resolution 64

# Stage 1: a tiny CLIP that aligns the demo captions and images; prints held-out retrieval accuracy.
demo-clip: demo-data
	$(PY) -m train.clip experiment=demo_clip trainer.resume=never

# Stage 2: the demo CLIP's embeddings of every scene, then the tiny prior trained from them alone;
# prints the held-out cosine of sampled image embeddings next to the baseline cosine(text, image).
demo-prior: demo-clip
	rm -rf $(DEMO_DIR)/emb_train $(DEMO_DIR)/emb_heldout
	$(PY) -m data.embed --shards $(DEMO_DIR)/train --clip runs/demo-clip/export --out $(DEMO_DIR)/emb_train \
	    --batch-size 512
	$(PY) -m data.embed --shards $(DEMO_DIR)/heldout --clip runs/demo-clip/export --out $(DEMO_DIR)/emb_heldout \
	    --batch-size 512
	$(PY) -m train.prior experiment=demo_prior trainer.resume=never

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(DEMO_DIR) runs outputs multirun .pytest_cache
