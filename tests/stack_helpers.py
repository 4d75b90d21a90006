"""A tiny random unCLIP stack written as training exports: what generation and evaluation tests load.

Every model is small enough to sample in a fraction of a second on a CPU: a 16 px decoder, a
16 -> 64 and a 64 -> 256 upsampler, a prior and a CLIP of a few thousand parameters beyond the token
table. Weights are random (zero-initialized output layers nudged off zero, so the conditioning
reaches the output), which is all that shape, determinism and bookkeeping tests need.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from unclip.clip import ClipConfig, ClipEncoder, build_clip
from unclip.decoder import Decoder, DecoderConfig
from unclip.diffusion import DiffusionConfig
from unclip.export import write_export
from unclip.prior import DiffusionPrior, PriorConfig
from unclip.unet import UNetConfig
from unclip.upsampler import Upsampler, UpsamplerConfig

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _nudge(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def write_clip(folder: Path, seed: int = 0) -> ClipEncoder:
    torch.manual_seed(seed)
    clip = build_clip(ClipConfig(arch="custom", model_cfg=TINY_CLIP))
    clip.export(folder)
    return clip


def _export(folder: Path, model: torch.nn.Module, config: dict, run: str) -> Path:
    write_export(folder, model.state_dict(), config | {"run": run, "step": 0})
    return folder


def _clip_record(clip: ClipEncoder, clip_folder: Path) -> dict:
    return {"clip": asdict(ClipConfig(checkpoint=str(clip_folder.resolve()))), "clip_fingerprint": clip.fingerprint()}


def tiny_decoder(text_encoder: str = "clip", inpaint: bool = False, seed: int = 1) -> Decoder:
    torch.manual_seed(seed)
    unet = UNetConfig(
        image_size=16,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        num_head_channels=8,
        dropout=0.0,
        inpaint=inpaint,
    )
    diffusion = DiffusionConfig(target="eps", learn_sigma=True, sample_steps="4", clip_x0="static")
    decoder = Decoder(DecoderConfig(unet=unet, diffusion=diffusion, text_encoder=text_encoder), 16, 32)
    _nudge(decoder, seed)
    return decoder


def tiny_upsampler(low: int, scale: int = 4, seed: int = 3) -> Upsampler:
    torch.manual_seed(seed)
    unet = UNetConfig(image_size=low * scale, model_channels=8, channel_mult=[1, 2], num_res_blocks=1)
    unet.attention_resolutions = []
    unet.dropout = 0.0
    diffusion = DiffusionConfig(target="eps", sampler="ddim", sample_steps="ddim3", clip_x0="static")
    up = Upsampler(UpsamplerConfig(unet=unet, diffusion=diffusion, scale=scale, target_size=low * scale))
    _nudge(up, seed)
    return up


def write_stack(root: Path, *, inpaint: bool = False, clip_seed: int = 0) -> dict[str, Path]:
    """Exports of a whole tiny stack under root: {"clip", "prior", "decoder", "up256", "up1024"}."""
    root = Path(root)
    clip = write_clip(root / "clip" / "export", clip_seed)
    record = _clip_record(clip, root / "clip" / "export")
    torch.manual_seed(2)
    prior_cfg = PriorConfig(width=32, depth=1, heads=2, diffusion=DiffusionConfig(target="x0", sample_steps="3"))
    prior = DiffusionPrior(prior_cfg, clip.embed_dim, clip.text_width, clip.context_length)
    _nudge(prior, 2)
    paths = {"clip": root / "clip" / "export"}
    paths["prior"] = _export(root / "prior" / "export", prior, prior.export_config() | record, "tiny-prior")
    decoder = tiny_decoder(inpaint=inpaint)
    paths["decoder"] = _export(root / "decoder" / "export", decoder, decoder.export_config() | record, "tiny-decoder")
    for name, low in (("up256", 16), ("up1024", 64)):
        up = tiny_upsampler(low)
        paths[name] = _export(root / name / "export", up, up.export_config(), f"tiny-{name}")
    return paths
