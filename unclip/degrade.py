"""Degrading the upsamplers' conditioning images during training, so they forgive a decoder's flaws.

unCLIP (sec. 2.1, after GLIDE / cascaded diffusion): the 64->256 upsampler sees its low-resolution
input blurred (Gaussian, kernel 3, sigma 0.6); the 256->1024 one sees a BSR-style degradation
(Zhang et al. 2021, as in latent diffusion): random blur, downscaling with a random filter, Gaussian
noise and JPEG compression. Every random choice comes from the given generator, so a degradation
is a pure function of (images, seed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class DegradationConfig:
    kind: str = "blur"  # blur (64->256) | bsr (256->1024) | none
    blur_kernel: int = 3  # blur: unCLIP's kernel 3, sigma 0.6
    blur_sigma: float = 0.6
    bsr_blur_sigma: list[float] = field(default_factory=lambda: [0.2, 2.0])  # uniform range
    bsr_noise_std: list[float] = field(default_factory=lambda: [0.0, 0.05])  # in [-1, 1] units
    bsr_jpeg_quality: list[int] = field(default_factory=lambda: [30, 95])
    bsr_resize_modes: list[str] = field(default_factory=lambda: ["bilinear", "bicubic", "area"])

    def validate(self) -> None:
        if self.kind not in ("blur", "bsr", "none"):
            raise ValueError(f"degradation.kind must be blur, bsr or none, got {self.kind!r}")
        if self.blur_kernel % 2 == 0:
            raise ValueError("degradation.blur_kernel must be odd")


def gaussian_kernel(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), reflect-padded."""
    k = gaussian_kernel(size, sigma, x.device, x.dtype)
    c = x.shape[1]
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def downsample(x: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    size = (x.shape[-2] // scale, x.shape[-1] // scale)
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The low-resolution image brought to the target size, as the upsampler's extra input."""
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of one (3, H, W) image in [-1, 1]."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(back.copy()).permute(2, 0, 1).to(x.device, x.dtype) / 127.5 - 1


def _uniform(lo_hi, generator: torch.Generator | None) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def bsr_degrade(
    hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Per image: blur (random sigma), downscale by `scale` (random filter), noise, JPEG (random quality).
    Random choices come from `generator` (a CPU generator), or from torch's global RNG when None."""
    out = []
    for img in hr:
        x = img[None].float()
        sigma = _uniform(cfg.bsr_blur_sigma, generator)
        size = 2 * int(3 * sigma) + 1
        x = gaussian_blur(x, size, sigma)
        mode = cfg.bsr_resize_modes[int(torch.randint(len(cfg.bsr_resize_modes), (), generator=generator))]
        x = downsample(x, scale, mode)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = x + _uniform(cfg.bsr_noise_std, generator) * noise
        quality = int(round(_uniform(cfg.bsr_jpeg_quality, generator)))
        out.append(_jpeg(x[0], quality))
    return torch.stack(out).to(hr.dtype)


def make_low_res(
    hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator | None = None, train: bool = True
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the (B, 3, H/scale, W/scale) conditioning image; degraded when `train`
    (the same images and generator seed give the same degradation)."""
    cfg.validate()
    if not train or cfg.kind == "none":
        return downsample(hr.float(), scale).clamp(-1, 1)
    if cfg.kind == "blur":
        return gaussian_blur(downsample(hr.float(), scale), cfg.blur_kernel, cfg.blur_sigma).clamp(-1, 1)
    return bsr_degrade(hr, scale, cfg, generator).clamp(-1, 1)
