"""Which preset fits which GPU under which ZeRO stage: model-state memory per GPU, computed; and the
largest micro-batch of each preset that trains on this GPU, measured.

    python -m benchmarks.memory                     # 8 GPUs of 80 GB, bf16 + AdamW + our fp32 EMA
    python -m benchmarks.memory --gpus 32 --gpu-gb 40
    python -m benchmarks.memory --measure           # on a GPU: the largest micro-batch of every preset

Parameter counts come from building every preset on the meta device. Bytes per parameter follow
the ZeRO paper (Rajbhandari et al. 2020, sec. 3) for mixed precision with Adam: 2 (bf16 weights) +
2 (bf16 gradients) + 12 (fp32 master weights, Adam m and v), plus 4 for our EMA, which is sharded
across ranks at every stage (train/ema.py). Stage 0 is shown unsharded (DDP-style) although
DeepSpeed's bf16 optimizer partitions its fp32 states like ZeRO-1. Activations and temporary
buffers come on top and depend on the batch: a row that fits with little room to spare wants a
smaller per-GPU batch or activation checkpointing. These figures are computed, not measured.

--measure finds, on the GPU it runs on, the largest micro-batch of each preset for which one training
step fits: forward, backward and a fused AdamW step of the bare model (fp32 weights, bf16 autocast:
`precision=bf16_autocast`; the GPU default, bf16 weights with their flat fp32 master and fp32
gradients, holds 4 more bytes per parameter), doubling the batch until it runs out of memory, then
bisecting.
Rows are appended to benchmarks/results/memory.csv. On a CPU (--cpu-cap, a rehearsal) the search stops
at the cap instead of at the memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from train.config import compose, to_object
from unclip.decoder import Decoder
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

VIT_L = {"embed_dim": 768, "text_width": 768, "context_length": 77}
MEASURED_CSV = Path(__file__).parent / "results" / "memory.csv"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def preset_sizes() -> dict[str, int]:
    """Trained parameters of every paper-scale preset, built on the meta device (no memory)."""
    sizes = {}
    with torch.device("meta"):
        for preset in ("base", "paper_1b"):
            cfg = to_object(compose("prior", [f"model/prior={preset}"])).model.prior
            sizes[f"prior {preset}"] = _count(DiffusionPrior(cfg, VIT_L["embed_dim"], VIT_L["text_width"], 77))
        for preset, extra in (("base64", []), ("paper64", []), ("paper64", ["model.decoder.text_encoder=transformer"])):
            cfg = to_object(compose("decoder", [f"model/decoder={preset}", *extra])).model.decoder
            label = f"decoder {preset}" + (" + GLIDE text" if extra else "")
            sizes[label] = _count(Decoder(cfg, VIT_L["embed_dim"], VIT_L["text_width"]))
        for preset, stage in (("paper256", "up256"), ("paper1024", "up1024")):
            cfg = to_object(compose("upsampler", [f"model/upsampler={preset}", f"stage={stage}"])).model.upsampler
            sizes[f"upsampler {preset}"] = _count(Upsampler(cfg))
    return sizes


def frozen_clip_gb() -> dict[str, float]:
    """bf16 weights of a frozen CLIP in the loop (prior / decoder without precomputed embeddings): on every
    GPU, outside the engine, so no ZeRO stage shards it."""
    import open_clip

    sizes = {}
    with torch.device("meta"):
        for arch in ("ViT-L-14", "ViT-H-14"):
            sizes[arch] = _count(open_clip.create_model(arch, pretrained=None, device="meta")) * 2 / 2**30
    return sizes


def bytes_per_param(stage: str, gpus: int) -> float:
    """Model-state bytes per parameter on one GPU (weights, gradients, optimizer, EMA)."""
    ema = 4 / gpus
    if stage == "ddp":
        return 2 + 2 + 12 + ema
    if stage == "zero1":
        return 2 + 2 + 12 / gpus + ema
    if stage == "zero2":
        return 2 + (2 + 12) / gpus + ema
    if stage == "zero3":
        return (2 + 2 + 12) / gpus + ema
    if stage == "zero3_offload":
        return ema  # weights, gradients and optimizer live in CPU memory between uses
    raise ValueError(stage)


STAGES = ("ddp", "zero1", "zero2", "zero3", "zero3_offload")


def table(gpus: int, gpu_gb: float) -> str:
    rows = ["| model | params | " + " | ".join(STAGES) + " |", "|---|---:|" + "---:|" * len(STAGES)]
    for name, n in preset_sizes().items():
        cells = []
        for stage in STAGES:
            gb = n * bytes_per_param(stage, gpus) / 2**30
            mark = "ok" if gb < 0.6 * gpu_gb else ("tight" if gb < gpu_gb else "no")
            cells.append(f"{gb:.1f} {mark}")
        rows.append(f"| {name} | {n / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="data-parallel ranks the states are sharded over")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU")
    p.add_argument("--measure", action="store_true", help="measure the largest micro-batch of each preset")
    p.add_argument("--presets", nargs="*", default=None, help="--measure these (default: every paper preset)")
    p.add_argument("--cpu-cap", type=int, default=4, help="on a CPU, the batch where the search stops")
    p.add_argument("--csv", type=Path, default=MEASURED_CSV, help="where measured rows are appended")
    args = p.parse_args(argv)
    if args.measure:
        from benchmarks.fits import measure_presets

        measure_presets(args.presets, args.cpu_cap, args.csv)
        return
    print(
        f"Model-state GB per GPU over {args.gpus} GPUs (computed, not measured; activations excluded). "
        f"ok: under 60% of {args.gpu_gb:.0f} GB, tight: under 100%, no: over."
    )
    print(table(args.gpus, args.gpu_gb))
    clips = ", ".join(f"{arch} {gb:.1f} GB" for arch, gb in frozen_clip_gb().items())
    print(f"A frozen CLIP in the loop adds its bf16 weights on every GPU: {clips}.")


if __name__ == "__main__":
    main()
