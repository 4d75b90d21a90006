"""The speed settings, applied to a model from outside it (torchtitan's way): torch.compile at the
scope asked for, with its cache kept across restarts, and the channels-last layout. Each is a flag
(trainer.compile*, trainer.channels_last); what each buys is measured in docs/PERFORMANCE.md.

compile_scope:
- model: the whole trained model through DeepSpeed's engine.compile (one graph per forward, so the
  most fusion; the longest compile, and a recompile for each new input shape);
- blocks: each U-Net block and each transformer block compiled on its own (repeated blocks share
  their compiled code: shorter compiles, graph breaks confined to one block);
- norm_act: only the GroupNorm + SiLU pairs of the residual blocks, which compile to one kernel each
  (the fp32 normalization, the modulation, the activation and the casts around them), in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from train.distributed import is_main
from unclip.layers import TransformerBlock
from unclip.unet import Block, ResBlock, UNet, norm_modulate_silu, norm_silu

SCOPES = ("model", "blocks", "norm_act")


def check_speed_settings(tc, zero_stage: int, autocast: bool, precision: str) -> None:
    """Refuse combinations that cannot work, before anything is built, with what to change."""
    if tc.compile and tc.compile_scope not in SCOPES:
        raise ValueError(f"trainer.compile_scope must be one of {SCOPES}, got {tc.compile_scope!r}")
    if tc.compile and zero_stage == 3:
        raise ValueError(
            "trainer.compile=true is not supported under ZeRO-3 here (it gathers parameters module by module "
            "as the model runs): use distributed=zero2, or trainer.compile=false"
        )
    # channels_last changes the weights' layout after DeepSpeed has started. Under ZeRO every weight is a
    # view into one flat NCHW buffer; half-precision weights are stepped through fp32 master copies made
    # at start-up in NCHW, while their gradients come in NHWC. CUDA's fused AdamW refuses that pairing
    # (an H200 run, 2026-12-04); the CPU's pairs each weight with another position's gradient, silently.
    half_weights = precision != "fp32" and not autocast
    if tc.channels_last and (zero_stage >= 1 or half_weights):
        raise ValueError(
            "trainer.channels_last=true needs the optimizer to step the model's own fp32 weights: ZeRO views "
            "every weight into one flat NCHW buffer, and half-precision weights (precision=bf16 or fp16, any "
            "precision.master) are stepped through fp32 copies DeepSpeed made in the old layout. Use "
            "distributed.zero_stage=0 with precision=bf16_autocast or fp32"
        )


def use_compile_cache(folder: str | Path) -> None:
    """Inductor's compiled kernels and graphs in `folder`, kept across restarts: a requeued job, or the
    next run of the same model, loads them instead of compiling again (unless the user set a cache)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(folder).resolve()))
    torch._inductor.config.fx_graph_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = True


def apply_compile(engine, scope: str, backend: str, mode: str | None) -> int:
    """Compile the engine's model at `scope`; returns how many modules (or functions) were wrapped.
    Compilation itself happens at the first step that runs them."""
    options = {"backend": backend} | ({"mode": mode} if mode else {})
    if scope == "model":
        engine.compile(backend=backend, compile_kwargs={"mode": mode} if mode else {})
        return 1
    module: nn.Module = engine.module
    if scope == "blocks":
        blocks = [m for m in module.modules() if isinstance(m, Block | TransformerBlock)]
        # one compiled variant per distinct block shape (a U-Net has a dozen): past dynamo's default limit
        # of 8 the rest would silently run eager
        limit = max(torch._dynamo.config.recompile_limit, len(blocks))
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit
        )
        for block in blocks:
            block.compile(**options)
        return len(blocks)
    fused = torch.compile(norm_silu, **options), torch.compile(norm_modulate_silu, **options)
    blocks = [m for m in module.modules() if isinstance(m, ResBlock)]
    for block in blocks:
        block.norm_act, block.norm_modulate_act = fused
    return len(blocks)


def apply_channels_last(module: nn.Module) -> int:
    """Every U-Net of the model in NHWC (weights now, activations as they enter); returns how many."""
    unets = [m.use_channels_last() for m in module.modules() if isinstance(m, UNet)]
    if not unets and is_main():
        print("trainer.channels_last: this model has no U-Net (convolutions); nothing changed", flush=True)
    return len(unets)
