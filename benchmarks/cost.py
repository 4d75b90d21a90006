"""What a training recipe costs: FLOPs counted on the model, and the GPU-hours they take at an MFU.

    python -m benchmarks.cost experiment=paper_decoder             # one recipe, any Hydra overrides
    python -m benchmarks.cost experiment=paper_prior --mfu 0.30 --peak-tflops 989
    python -m benchmarks.cost --paper                               # the four paper stages, a table

FLOPs per sample are what torch.utils.flop_counter counts in one forward and backward of the trained
model on one sample, built on the meta device (no memory, no weights): matrix products and
convolutions, the convention MFU uses. The frozen CLIP is not counted: the recipes train from
precomputed embeddings (python -m data.embed, a one-off pass). Training FLOPs = FLOPs per sample x
trainer.batch_global x trainer.num_steps; GPU-hours = FLOPs / (MFU x peak) / 3600.

Without --mfu, a stage's MFU is this project's, measured through the trainer on one H200 (the same
989 dense TFLOP/s as an H100; docs/PERFORMANCE.md, 2026-12-04): the prior paper_1b at batch 256 in
bf16 43.0%, the decoder base64 at batch 64 in bf16 15.8% (it stands in for the 3.5B paper64, not yet
timed), the upsampler paper256 at batch 32 under bf16 autocast 24.1%. The peer's, DALLE2-pytorch on
one H100, were decoder U-Net 13.5% and prior 11.6%.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from train.config import compose, experiment_entrypoint, to_object
from train.flops import count_flops
from unclip.decoder import Decoder
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

H100_BF16_TFLOPS = 989.0  # dense, SXM (train/flops.py)
OUR_MFU = {"prior": 0.430, "decoder": 0.158, "upsampler": 0.241}  # measured (see the docstring)
PAPER_STAGES = ("paper_prior", "paper_decoder", "paper_up256", "paper_up1024")
# The recipes leave the data and the CLIP weights to the user; neither changes the model's FLOPs.
PLACEHOLDERS = ["data.shards=unused", "data.embeddings=unused"]


def entrypoint(overrides: list[str]) -> str:
    """The training entrypoint an experiment belongs to: paper_prior -> prior, paper_up256 -> upsampler."""
    for o in overrides:
        if o.startswith("experiment=") and (entry := experiment_entrypoint(o.split("=", 1)[1])):
            return entry
    raise ValueError("name an experiment (experiment=paper_decoder, ...) so the entrypoint is known")


def clip_widths(clip_cfg) -> tuple[int, int, int]:
    """(embedding width, text width, context length) of the CLIP architecture, from open_clip's config."""
    import open_clip

    cfg = clip_cfg.model_cfg or open_clip.get_model_config(clip_cfg.arch)
    text = cfg["text_cfg"]
    return cfg["embed_dim"], text["width"], text.get("context_length", 77)


def flops_per_sample(entry: str, job: Any) -> int:
    """One forward and backward of the trained model on one sample, counted on the meta device."""
    with torch.device("meta"):
        if entry == "prior":
            dim, width, context = clip_widths(job.model.clip)
            model = DiffusionPrior(job.model.prior, dim, width, context)
            inputs = (torch.empty(1, dim), torch.zeros(1), torch.empty(1, dim), torch.empty(1, context, width))
            call = lambda: model(*inputs, torch.ones(1, context, dtype=torch.bool))  # noqa: E731
        elif entry == "decoder":
            dim, width, context = clip_widths(job.model.clip)
            cfg = job.model.decoder
            model = Decoder(cfg, dim, width)
            size = cfg.unet.image_size
            text = (
                {"token_ids": torch.zeros(1, cfg.text_transformer.context_length, dtype=torch.long)}
                if cfg.text_encoder == "transformer"
                else {
                    "text_tokens": torch.empty(1, context, width),
                    "text_mask": torch.ones(1, context, dtype=torch.bool),
                }
            )
            call = lambda: model(torch.empty(1, 3, size, size), torch.zeros(1), torch.empty(1, dim), **text)  # noqa: E731
        elif entry == "upsampler":
            model = Upsampler(job.model.upsampler)
            crop = job.model.upsampler.crop_size
            call = lambda: model(torch.empty(1, 3, crop, crop), torch.zeros(1), torch.empty(1, 3, crop, crop))  # noqa: E731
        else:
            raise ValueError(f"no cost model for {entry}")
        return count_flops(lambda: call().float().sum().backward())


def cost(overrides: list[str], mfu: float | None, peak_tflops: float) -> dict[str, Any]:
    entry = entrypoint(overrides)
    job = to_object(compose(entry, [*overrides, *PLACEHOLDERS]))
    per_sample = flops_per_sample(entry, job)
    batch, steps = job.trainer.batch_global, job.trainer.num_steps
    if batch is None:
        raise ValueError("the recipe gives no trainer.batch_global: set it to count the run's samples")
    total = per_sample * batch * steps
    mfu = mfu if mfu is not None else OUR_MFU[entry]
    hours = total / (mfu * peak_tflops * 1e12) / 3600
    return {
        "recipe": " ".join(overrides),
        "entry": entry,
        "flops_per_sample": per_sample,
        "batch": batch,
        "steps": steps,
        "samples": batch * steps,
        "flops": total,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "gpu_hours": hours,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | GFLOP / sample | batch x steps | training FLOPs | MFU | GPU-hours at that MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['flops_per_sample'] / 1e9:,.1f} | {r['batch']:,} x {r['steps']:,} | "
            f"{r['flops']:.2e} | {r['mfu']:.1%} | {r['gpu_hours']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides naming the recipe: experiment=paper_decoder ...")
    p.add_argument("--paper", action="store_true", help="the four paper stages, one row each")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilization to assume (0-1)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="the GPU's dense peak")
    args = p.parse_args(argv)
    recipes = [[f"experiment={name}"] for name in PAPER_STAGES] if args.paper else [args.overrides]
    if not args.paper and not args.overrides:
        p.error("give a recipe (experiment=paper_decoder ...) or --paper")
    try:
        rows = [cost(r, args.mfu, args.peak_tflops) for r in recipes]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Training cost at {args.peak_tflops:.0f} TFLOP/s peak (FLOPs counted on the model; see --help).")
    print(table(rows))


if __name__ == "__main__":
    main()
