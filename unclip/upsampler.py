"""unCLIP's upsamplers: 64->256 and 256->1024 (Ramesh et al. 2022, sec. 2.1 and App. C).

A fully convolutional U-Net (no attention, no caption) that sees the low-resolution image, upsampled
bicubically, next to the noisy image. Trained on random crops of a quarter of the target size with
a degraded conditioning image (unclip/degrade.py), applied to whole images at sampling time.
Optionally the conditioning image is noise-augmented during training (cascaded diffusion), and the
model is told the augmentation level.

    up = load_upsampler("runs/up256/export")
    hi = up.sample(low_res_images, generator=make_generator(0))     # (B, 3, 4h, 4w) in [-1, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unclip.degrade import DegradationConfig, upgrade_degradation_record, upsample
from unclip.diffusion import Diffusion, DiffusionConfig, Generators, randn
from unclip.export import CONFIG, read_export
from unclip.records import from_record
from unclip.unet import UNet, UNetConfig


def _up_unet() -> UNetConfig:
    return UNetConfig(image_size=256, model_channels=320, attention_resolutions=[], low_res_channels=3)


def _up_diffusion() -> DiffusionConfig:
    # unCLIP App. C: eps target; 64->256 cosine with 27 DDIM steps (256->1024: linear, 15 DDIM steps)
    return DiffusionConfig(schedule="cosine", target="eps", sampler="ddim", sample_steps="ddim27", clip_x0="static")


@dataclass
class UpsamplerConfig:
    unet: UNetConfig = field(default_factory=_up_unet)
    diffusion: DiffusionConfig = field(default_factory=_up_diffusion)
    scale: int = 4  # target side / conditioning side
    target_size: int = 256  # the resolution it produces (the data's resolution when training)
    crop_fraction: float = 0.25  # trained on random crops of this fraction of the target side
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    noise_aug_max: float = 0.0  # >0: add N(0, s^2) to the conditioning image, s ~ U(0, max), when training
    noise_aug_sample: float = 0.0  # the level used when sampling (0 = clean conditioning)
    predict_residual: bool = False  # x0 target only: the network predicts x0 minus the upsampled
    #                                 conditioning image, so colors come from it and only detail is learned

    def validate(self) -> None:
        if self.predict_residual and self.diffusion.target != "x0":
            raise ValueError("upsampler.predict_residual needs diffusion.target=x0")
        if self.unet.attention_resolutions:
            raise ValueError("an upsampler is fully convolutional: set unet.attention_resolutions=[]")
        if self.target_size % self.scale:
            raise ValueError(f"target_size {self.target_size} is not a multiple of scale {self.scale}")
        self.degradation.validate()
        self.diffusion.validate()

    @property
    def crop_size(self) -> int:
        return int(self.target_size * self.crop_fraction)


class Upsampler(nn.Module):
    def __init__(self, cfg: UpsamplerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        unet_cfg = replace(
            cfg.unet, low_res_channels=3, noise_level_cond=cfg.noise_aug_max > 0, clip_dim=0, text_width=0
        )
        self.unet = UNet(unet_cfg, cfg.diffusion.learn_sigma)
        self.diffusion = Diffusion(cfg.diffusion)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, low_res_up: torch.Tensor, noise_level: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, 3, H, W) noisy image; low_res_up (B, 3, H, W) the conditioning image already upsampled."""
        out = self.unet(x, t, low_res=low_res_up, noise_level=noise_level)
        if self.cfg.predict_residual:
            pred, rest = out[:, :3], out[:, 3:]
            out = torch.cat([pred + low_res_up.to(pred.dtype), rest], dim=1)
        return out

    @torch.no_grad()
    def sample(
        self,
        low_res: torch.Tensor,
        *,
        steps: str | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: Generators = None,
        noise_level: float | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, 3, h, w) images in [-1, 1] -> (B, 3, h * scale, w * scale), at any h and w.

        generator: one, or one per image. known / known_mask (B, 3 | 1, H, W) at the output size, 1 =
        known: that region is kept (pasted back after every step), as inpainting needs."""
        b, _, h, w = low_res.shape
        size = (h * self.cfg.scale, w * self.cfg.scale)
        cond = upsample(low_res, size)
        level = self.cfg.noise_aug_sample if noise_level is None else noise_level
        levels = None
        if self.cfg.noise_aug_max > 0:
            cond = cond + level * randn(cond.shape, generator, cond.device)
            levels = torch.full((b,), float(level), device=cond.device)
        diffusion = self.diffusion.respaced(steps)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self(x, t, cond, levels).float()

        shape = (b, 3, *size)
        x = diffusion.sample(
            model_fn,
            shape,
            generator=generator,
            device=low_res.device,
            sampler=sampler,
            eta=eta,
            known=known,
            known_mask=known_mask,
            on_step=on_step,
        )
        return x.clamp(-1, 1)

    def export_config(self) -> dict[str, Any]:
        return {"kind": "upsampler", "upsampler": asdict(self.cfg)}


def upsampler_config_from_record(raw: Any, where: str = "config") -> UpsamplerConfig:
    """An export's upsampler record as an UpsamplerConfig, every key and type checked (unclip.records)."""
    if isinstance(raw, dict) and isinstance(raw.get("degradation"), dict):
        raw = raw | {"degradation": upgrade_degradation_record(raw["degradation"])}
    return from_record(UpsamplerConfig, raw, f"{where}: upsampler")


def upsampler_from_config(config: dict[str, Any], where: str = "config") -> Upsampler:
    """An upsampler built from an export config (`where` names it in errors)."""
    return Upsampler(upsampler_config_from_record(config["upsampler"], where))


def load_upsampler(folder: str | Path, device: str | torch.device = "cpu") -> Upsampler:
    """An upsampler from a training export (runs/<name>/export), in eval mode."""
    weights, config = read_export(folder, kind="upsampler")
    up = upsampler_from_config(config, str(Path(folder) / CONFIG))
    try:
        up.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the weights do not fit the exported upsampler config: {e}") from e
    return up.to(device).eval()
