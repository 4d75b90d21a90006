"""The largest micro-batch of each preset that trains on this device (python -m benchmarks.memory --measure).

One training step of the bare model: random inputs of the preset's shapes (64 px images and 77 CLIP
tokens of width 768 for the decoder, ViT-L/14's 768-d embeddings for the prior, 64 px crops for the
upsamplers), forward and backward under bf16 autocast over fp32 weights, a fused AdamW step (its
states allocated at that first step). The batch doubles until a step runs out of memory, then is
bisected between the last that fitted and the first that did not, to within 1/16 of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from benchmarks.memory import VIT_L
from benchmarks.train_step import append_csv
from train.config import compose, to_object
from unclip.decoder import Decoder
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

PRESETS = ("prior base", "prior paper_1b", "decoder base64", "decoder paper64", "decoder paper64+glide",
           "upsampler paper256", "upsampler paper1024", "decoder tiny", "upsampler tiny", "prior tiny")  # fmt: skip
PAPER = PRESETS[:7]
D, W, T = VIT_L["embed_dim"], VIT_L["text_width"], VIT_L["context_length"]


def build(preset: str) -> tuple[torch.nn.Module, Callable[[int, torch.device], tuple]]:
    """(model, inputs(batch, device) -> the forward's arguments) for a preset name."""
    kind, name = preset.split(" ")
    mask = lambda b, dev: torch.ones(b, T, dtype=torch.bool, device=dev)  # noqa: E731
    if kind == "prior":
        cfg = to_object(compose("prior", [f"model/prior={name}"])).model.prior
        return DiffusionPrior(cfg, D, W, T), lambda b, dev: (
            _n(b, D, dev=dev), _t(b, dev), _n(b, D, dev=dev), _n(b, T, W, dev=dev), mask(b, dev)
        )  # fmt: skip
    if kind == "decoder":
        glide = name.endswith("+glide")
        extra = ["model.decoder.text_encoder=transformer"] if glide else []
        cfg = to_object(compose("decoder", [f"model/decoder={name.removesuffix('+glide')}", *extra])).model.decoder
        side, context = cfg.unet.image_size, cfg.text_transformer.context_length
        image = lambda b, dev: (_n(b, 3, side, side, dev=dev), _t(b, dev), _n(b, D, dev=dev))  # noqa: E731
        if glide:  # GLIDE's own text transformer reads token ids
            ids = lambda b, dev: torch.randint(1, 1000, (b, context), device=dev)  # noqa: E731
            return Decoder(cfg, D, W), lambda b, dev: (*image(b, dev), None, None, ids(b, dev))
        return Decoder(cfg, D, W), lambda b, dev: (*image(b, dev), _n(b, T, W, dev=dev), mask(b, dev))
    stage = "up1024" if name == "paper1024" else "up256"
    cfg = to_object(compose("upsampler", [f"model/upsampler={name}", f"stage={stage}"])).model.upsampler
    crop = cfg.crop_size  # trained on crops; the conditioning image comes already upsampled to the crop
    return Upsampler(cfg), lambda b, dev: (_n(b, 3, crop, crop, dev=dev), _t(b, dev), _n(b, 3, crop, crop, dev=dev))


def _n(*shape: int, dev) -> torch.Tensor:
    return torch.randn(*shape, device=dev)


def _t(b: int, dev) -> torch.Tensor:
    return torch.randint(0, 1000, (b,), device=dev).float()


def fits(model: torch.nn.Module, inputs, batch: int, device: torch.device, opt) -> bool:
    """Whether one training step at `batch` runs without running out of memory."""
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(*inputs(batch, device))
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(preset: str, device: torch.device, cap: int) -> tuple[int, float, float]:
    """(the largest micro-batch that fits, its peak GB, seconds the search took)."""
    started = time.time()
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: the 3.5B decoder's init takes 49 s on a 2-core CPU
        model, inputs = build(preset)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in ("cuda", "cpu"))
    good, bad = 0, None
    batch = 1
    while bad is None and batch <= cap:
        if fits(model, inputs, batch, device, opt):
            good, batch = batch, batch * 2
        else:
            bad = batch
    while bad is not None and bad - good > max(1, good // 16):  # to within 1/16: each try is a training step
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(model, inputs, middle, device, opt) else (good, middle)
    peak = 0.0
    if device.type == "cuda" and good:
        torch.cuda.reset_peak_memory_stats()
        fits(model, inputs, good, device, opt)
        peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return good, peak, time.time() - started


def measure_presets(presets: list[str] | None, cpu_cap: int, csv: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU (search capped at {cpu_cap})"
    cap = 1 << 16 if device.type == "cuda" else cpu_cap
    print(f"largest micro-batch of one training step, {where}, fp32 weights + bf16 autocast + fused AdamW")
    print("| preset | largest micro-batch | peak GB | search s |")
    print("|---|---:|---:|---:|")
    for preset in presets or (PAPER if device.type == "cuda" else ("decoder tiny", "upsampler tiny", "prior tiny")):
        good, peak, took = largest_batch(preset, device, cap)
        print(f"| {preset} | {good}{'+' if good >= cap else ''} | {peak:.1f} | {took:.0f} |", flush=True)
        row = {"date": date.today().isoformat(), "device": where, "preset": preset, "largest_micro_batch": good}
        append_csv(csv, row | {"peak_gb": round(peak, 2), "search_s": round(took, 1)})
