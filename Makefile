# Every target does its own set-up on a fresh clone.
#   make demo   the whole stack on the embedded synthetic data set, on CPU
#   make test   the CPU test suite (creates .venv first)
#   make serve  the Images API and the editor over the demo's stack (after make demo)
#   make lint   ruff and shellcheck
# TORCH_SPEC pins torch for this CPU machine; on a GPU box pass the build you want, e.g.
#   make setup TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed          # what running needs (the demo, make serve): the package, watermark and serve extras
DEV_STAMP := $(VENV)/.installed-dev  # what testing needs on top: pytest, ruff, shellcheck, scipy, submitit
DEMO_DIR ?= datasets/demo
GEN_DIR ?= samples/demo
# The demo's scenes (data/synthetic.py PRESETS): simple centres one shape, which the tiny decoder learns
# in minutes; varied moves and turns it, moved moves it upright on a grid, so a caption leaves room for
# its candidates to differ (README, "make demo"; docs/GENERATION.md)
DEMO_PRESET ?= simple
# varied and moved: a convolutional CLIP image tower (the ViT's embeddings lose a moved shape), and the
# demo fails unless a caption's candidates stand at least half as far apart as real scenes of it do
ifneq ($(filter $(DEMO_PRESET),varied moved),)
DEMO_CLIP_ARGS ?= model/clip=tiny_resnet trainer.num_steps=500
DEMO_FOLLOWING_ARGS ?= --min-diversity 0.5
# the paper's variations start from the scene's inverted latent and keep its layout; these scenes leave
# room to move, so the demo also draws variations from fresh noise, which keep the content and move it
DEMO_NOISE_VARIATIONS = yes
endif
# varied: the decoder given 1.8 times simple's steps (docs/GENERATION.md, "The decoder's share"); it draws
# turned shapes only in part yet
ifeq ($(DEMO_PRESET),varied)
DEMO_DECODER_ARGS ?= trainer.num_steps=1800 trainer.val_every=900 trainer.sample_every=900 trainer.ckpt_every=900
endif
# moved: the embedding's shape template follows the shape over the grid (unet.spatial_embed_follows), the
# decoder reads the caption as well as the image embedding, as the paper's does (text_encoder=clip), and
# trains 3000 steps at lr_peak 3e-3 in bf16 weights (DeepSpeed's flat fp32 master) where the CPU has native bf16:
# 91-96% of 256 held-out captions' shapes right through the prior on three stacks, as after the 5400 steps it took before
# (docs/GENERATION.md, "The moved decoder in 3000 steps")
ifeq ($(DEMO_PRESET),moved)
DEMO_DECODER_ARGS ?= trainer.num_steps=3000 trainer.val_every=1500 trainer.sample_every=1500 trainer.ckpt_every=1500 \
	optim.lr_peak=3e-3 model.decoder.unet.spatial_embed_follows=true model.decoder.text_encoder=clip
DECODER_PRECISION ?= $(if $(CPU_BF16),bf16,fp32)
endif
# demo-generate and demo-eval check for the trained stack before they clear their last outputs
DEMO_STACK_CHECK = @for part in clip prior decoder upsampler; do test -d runs/demo-$$part/export || \
	{ echo "$@: runs/demo-$$part/export is missing: make demo trains the stack first" >&2; exit 1; }; done
# Every stage reads the scenes and embeddings under $(DEMO_DIR) (the experiments' defaults name datasets/demo)
DEMO_SCENES = data.shards=$(DEMO_DIR)/train data.heldout_shards=$(DEMO_DIR)/heldout
DEMO_EMBEDDINGS = $(DEMO_SCENES) data.embeddings=$(DEMO_DIR)/emb_train data.heldout_embeddings=$(DEMO_DIR)/emb_heldout
# bf16 where the CPU computes it natively (AVX512_BF16 / AMX: the demo's training and sampling 1.4x
# faster), fp32 where it would be emulated (many times slower); the demo experiments are tuned for both.
CPU_BF16 := $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo yes)
TRAIN_PRECISION ?= $(if $(CPU_BF16),bf16_autocast,fp32)
DECODER_PRECISION ?= $(TRAIN_PRECISION)
GEN_PRECISION ?= $(if $(CPU_BF16),bf16,fp32)
GEN_FLAGS = --stack runs/demo --precision $(GEN_PRECISION) --no-progress
# Tests and the demo never reach for the network.
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup dev-setup serve demo demo-data demo-clip demo-prior demo-decoder demo-upsampler demo-generate demo-eval test readme-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[watermark,serve]'
	touch $(STAMP)

dev-setup: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# The training stages, then (in a make of their own, so they start after every model is trained) the
# generation and the eval; demo-generate and demo-eval alone use the stack in runs/ as it is.
demo: demo-decoder demo-upsampler
	$(MAKE) --no-print-directory demo-generate demo-eval
	@echo "demo: done. Data in $(DEMO_DIR)/, runs in runs/demo-*/, images in $(GEN_DIR)/, the eval in evals/demo/."

# The demo's scenes: the synthetic set's $(DEMO_PRESET) preset, written once (reruns skip finished shards).
demo-data: setup
	$(PY) -m data.synthetic --out $(DEMO_DIR)/train --split train --preset $(DEMO_PRESET) --num-samples 20000 \
	    --resolution 64 --workers 2 --contact-sheet $(DEMO_DIR)/train_contact_sheet.png
	$(PY) -m data.synthetic --out $(DEMO_DIR)/heldout --split heldout --preset $(DEMO_PRESET) --num-samples 1000 \
	    --resolution 64
	$(PY) -m data.synthetic --out $(DEMO_DIR)/train256 --split train --preset $(DEMO_PRESET) --num-samples 3000 \
	    --resolution 256 --workers 2
	$(PY) -m data.synthetic --out $(DEMO_DIR)/heldout256 --split heldout --preset $(DEMO_PRESET) --num-samples 200 \
	    --resolution 256

# Stage 1: a tiny CLIP that aligns the demo captions and images; prints held-out retrieval accuracy.
demo-clip: demo-data
	rm -rf runs/demo-clip
	$(PY) -m train.clip experiment=demo_clip $(DEMO_SCENES) $(DEMO_CLIP_ARGS)

# Stage 2: the demo CLIP's embeddings of every scene, then the tiny prior trained from them alone;
# prints the held-out cosine of sampled image embeddings next to the baseline cosine(text, image).
demo-prior: demo-clip
	rm -rf $(DEMO_DIR)/emb_train $(DEMO_DIR)/emb_heldout
	$(PY) -m data.embed --shards $(DEMO_DIR)/train --clip runs/demo-clip/export --out $(DEMO_DIR)/emb_train \
	    --batch-size 512
	$(PY) -m data.embed --shards $(DEMO_DIR)/heldout --clip runs/demo-clip/export --out $(DEMO_DIR)/emb_heldout \
	    --batch-size 512
	rm -rf runs/demo-prior
	$(PY) -m train.prior experiment=demo_prior $(DEMO_EMBEDDINGS)

# Stage 3: the tiny 64px decoder from the CLIP image embeddings; its grids show held-out scenes,
# their reconstructions, and images decoded from the captions through the prior.
demo-decoder: demo-prior
	rm -rf runs/demo-decoder
	$(PY) -m train.decoder experiment=demo_decoder precision=$(DECODER_PRECISION) $(DEMO_EMBEDDINGS) \
	    $(DEMO_DECODER_ARGS)
	@echo "decoder sample grid: $$(ls runs/demo-decoder/samples/*.png | tail -1)"

# Stage 4: the tiny 64->256 upsampler; its grids upsample whole held-out scenes.
demo-upsampler: demo-data
	rm -rf runs/demo-upsampler
	$(PY) -m train.upsampler experiment=demo_upsampler precision=$(TRAIN_PRECISION) \
	    data.shards=$(DEMO_DIR)/train256 data.heldout_shards=$(DEMO_DIR)/heldout256
	@echo "upsampler sample grid: $$(ls runs/demo-upsampler/samples/*.png | tail -1)"

# Stage 5: the whole stack generating through python -m unclip.sample: text-to-image for 16 held-out
# captions (4 images each, a contact sheet per caption, 256px), variations of a held-out scene, an
# interpolation between two others (a red square on black, a green circle on yellow), an inpainting and
# an outpainting example; then how many images show the shape and colors asked for. It trains nothing:
# after a change to sampling, `make demo-generate` redraws with the stack in runs/.
demo-generate: setup
	$(DEMO_STACK_CHECK)
	rm -rf $(GEN_DIR)
	$(PY) -m data.synthetic --split heldout --preset $(DEMO_PRESET) --prompts-out $(GEN_DIR)/prompts.txt --prompts-count 16
	mkdir -p $(GEN_DIR) && tar -xOf $(DEMO_DIR)/heldout256/00000.tar 000000002.png > $(GEN_DIR)/scene.png
	tar -xOf $(DEMO_DIR)/heldout256/00000.tar 000000005.png > $(GEN_DIR)/from.png
	tar -xOf $(DEMO_DIR)/heldout256/00000.tar 000000006.png > $(GEN_DIR)/to.png
	$(PY) -m unclip.sample text --prompts $(GEN_DIR)/prompts.txt --num-images 4 $(GEN_FLAGS) --out $(GEN_DIR)/text
	$(PY) -m unclip.sample variations $(GEN_DIR)/scene.png --num-images 4 $(GEN_FLAGS) --out $(GEN_DIR)
	$(if $(DEMO_NOISE_VARIATIONS),$(PY) -m unclip.sample variations $(GEN_DIR)/scene.png --start noise \
	    --num-images 4 $(GEN_FLAGS) --out $(GEN_DIR)/fresh-noise)
	$(PY) -m unclip.sample interpolate $(GEN_DIR)/from.png $(GEN_DIR)/to.png --frames 5 $(GEN_FLAGS) --out $(GEN_DIR)
	$(PY) -m unclip.sample inpaint $(GEN_DIR)/scene.png --box 32,32,224,224 \
	    --prompt "a big yellow circle on a purple background" --num-images 2 $(GEN_FLAGS) --out $(GEN_DIR)
	$(PY) -m unclip.sample outpaint $(GEN_DIR)/scene.png --extend 64,64,0,0 --num-images 2 $(GEN_FLAGS) --out $(GEN_DIR)
	$(PY) -m data.following $(GEN_DIR)/text --shards $(DEMO_DIR)/heldout $(DEMO_FOLLOWING_ARGS)
	@echo "text-to-image contact sheets: $(GEN_DIR)/text/*/sheet.png; edits: $(GEN_DIR)/{variations-scene,interpolate-from-to,inpaint-scene,outpaint-scene}-*/sheet.png$(if $(DEMO_NOISE_VARIATIONS), and $(GEN_DIR)/fresh-noise/variations-scene-*/sheet.png)"

# Stage 6: the eval report: FD-CLIP and the CLIP score (with the demo CLIP; FID needs Inception weights,
# a download) of 160 held-out captions at 64px, next to real-vs-real, and the captions followed (with the
# stack in runs/, as demo-generate).
demo-eval: setup
	$(DEMO_STACK_CHECK)
	rm -rf evals/demo
	$(PY) -m eval name=demo model.stack=runs/demo model.precision=$(GEN_PRECISION) data.shards=$(DEMO_DIR)/heldout \
	    data.count=160 data.resolution=64 pipeline.stop_at=64 eval.fid=false eval.real_vs_real=true eval.kid=true

# The Images API and the editor over the demo's stack (after make demo): http://127.0.0.1:8000/
serve: setup
	$(PY) -m unclip.serve --stack runs/demo --precision $(GEN_PRECISION)

test: dev-setup
	WANDB_MODE=disabled $(PY) -m pytest -q

# Every command in README.md against the code: Hydra overrides compose, argparse flags parse (part of make test).
readme-check: dev-setup
	$(PY) -m pytest -q tests/test_readme.py

lint: dev-setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/shellcheck -x launch/run.sh slurm/job.sh slurm/*.sbatch benchmarks/gpu.sh

clean:
	rm -rf $(DEMO_DIR) $(GEN_DIR) runs evals outputs multirun .pytest_cache
