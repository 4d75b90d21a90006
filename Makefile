# Every target does its own set-up on a fresh clone.
#   make demo   the whole stack on the embedded synthetic data set, on CPU
#   make test   the CPU test suite (creates .venv first)
#   make lint   ruff and shellcheck
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

.PHONY: setup demo demo-data demo-clip demo-prior demo-decoder demo-upsampler test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: demo-data demo-clip demo-prior demo-decoder demo-upsampler
	@echo "demo: done. Data in $(DEMO_DIR)/, runs in runs/demo-*/ (metrics.jsonl, samples/, export/)."

# The demo's scenes: the synthetic set's "simple" preset, written once (reruns skip finished shards).
demo-data: setup
	$(PY) -m data.synthetic --out $(DEMO_DIR)/train --split train --preset simple --num-samples 20000 \
	    --resolution 64 --workers 2 --contact-sheet $(DEMO_DIR)/train_contact_sheet.png
	$(PY) -m data.synthetic --out $(DEMO_DIR)/heldout --split heldout --preset simple --num-samples 1000 \
	    --resolution 64
	$(PY) -m data.synthetic --out $(DEMO_DIR)/train256 --split train --preset simple --num-samples 6000 \
	    --resolution 256 --workers 2
	$(PY) -m data.synthetic --out $(DEMO_DIR)/heldout256 --split heldout --preset simple --num-samples 200 \
	    --resolution 256

# Stage 1: a tiny CLIP that aligns the demo captions and images; prints held-out retrieval accuracy.
demo-clip: demo-data
	rm -rf runs/demo-clip
	$(PY) -m train.clip experiment=demo_clip

# Stage 2: the demo CLIP's embeddings of every scene, then the tiny prior trained from them alone;
# prints the held-out cosine of sampled image embeddings next to the baseline cosine(text, image).
demo-prior: demo-clip
	rm -rf $(DEMO_DIR)/emb_train $(DEMO_DIR)/emb_heldout
	$(PY) -m data.embed --shards $(DEMO_DIR)/train --clip runs/demo-clip/export --out $(DEMO_DIR)/emb_train \
	    --batch-size 512
	$(PY) -m data.embed --shards $(DEMO_DIR)/heldout --clip runs/demo-clip/export --out $(DEMO_DIR)/emb_heldout \
	    --batch-size 512
	rm -rf runs/demo-prior
	$(PY) -m train.prior experiment=demo_prior

# Stage 3: the tiny 64px decoder from the CLIP image embeddings; its grids show held-out scenes,
# their reconstructions, and images decoded from the captions through the prior.
demo-decoder: demo-prior
	rm -rf runs/demo-decoder
	$(PY) -m train.decoder experiment=demo_decoder
	@echo "decoder sample grid: $$(ls runs/demo-decoder/samples/*.png | tail -1)"

# Stage 4: the tiny 64->256 upsampler; its grids upsample whole held-out scenes.
demo-upsampler: demo-data
	rm -rf runs/demo-upsampler
	$(PY) -m train.upsampler experiment=demo_upsampler
	@echo "upsampler sample grid: $$(ls runs/demo-upsampler/samples/*.png | tail -1)"

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/shellcheck -x launch/run.sh slurm/job.sh slurm/*.sbatch

clean:
	rm -rf $(DEMO_DIR) runs outputs multirun .pytest_cache
