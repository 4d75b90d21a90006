"""Degrading the upsamplers' conditioning images during training, so they forgive a decoder's flaws.

unCLIP (sec. 2.1, after GLIDE / cascaded diffusion): the 64->256 upsampler sees its low-resolution
input blurred (Gaussian, kernel 3, sigma 0.6); the 256->1024 one sees BSR degradation (Zhang et al.
2021, BSRGAN's `degradation_bsrgan`, as latent diffusion uses it): in a shuffled order, two blurs
(isotropic or anisotropic Gaussian kernels), a downscale with a random factor and filter (or a
shifted blur and nearest subsampling), the resize to the final size, Gaussian noise (color, gray
or channel-correlated, up to 25/255) and JPEG at a random quality; then a final JPEG. BSRGAN's
camera-pipeline step needs its ISP model and is left out. `kind=simple` keeps the one-pass blur,
resize, noise, JPEG of earlier versions.

Every random choice comes from the given generator, so a degradation is a pure function of (images,
seed); `bsr_plan` draws the choices for one image and `apply_plan` carries them out.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("bilinear", "bicubic", "area")  # cv2's INTER_LINEAR, INTER_CUBIC, INTER_AREA (BSRGAN)


@dataclass
class DegradationConfig:
    kind: str = "blur"  # blur (64->256) | bsr (256->1024, BSRGAN's) | simple (one pass) | none
    blur_kernel: int = 3  # blur: unCLIP's kernel 3, sigma 0.6
    blur_sigma: float = 0.6
    # bsr: BSRGAN's own settings
    bsr_noise_levels: list[int] = field(default_factory=lambda: [2, 25])  # noise std in 1/255 steps
    bsr_jpeg_quality: list[int] = field(default_factory=lambda: [30, 95])
    bsr_jpeg_prob: float = 0.9  # the JPEG inside the shuffled chain (a final JPEG always follows)
    bsr_half_first_prob: float = 0.25  # x4 only: halve first, and the chain then downscales by 2
    # simple: one pass of each
    simple_blur_sigma: list[float] = field(default_factory=lambda: [0.2, 2.0])  # uniform range
    simple_noise_std: list[float] = field(default_factory=lambda: [0.0, 0.05])  # in [-1, 1] units
    simple_jpeg_quality: list[int] = field(default_factory=lambda: [30, 95])
    simple_resize_modes: list[str] = field(default_factory=lambda: list(RESIZE_MODES))

    def validate(self) -> None:
        if self.kind not in ("blur", "bsr", "simple", "none"):
            raise ValueError(f"degradation.kind must be blur, bsr, simple or none, got {self.kind!r}")
        if self.blur_kernel % 2 == 0:
            raise ValueError("degradation.blur_kernel must be odd")


def upgrade_degradation_record(raw: dict[str, Any]) -> dict[str, Any]:
    """An export's degradation record in today's names. Records written before BSRGAN's degradation
    existed called the one-pass degradation `bsr` and its ranges bsr_*: that is now `simple`."""
    if "bsr_blur_sigma" in raw:
        raw = {("simple_" + k[4:] if k.startswith("bsr_") else k): v for k, v in raw.items()}
        raw["kind"] = "simple" if raw.get("kind") == "bsr" else raw.get("kind", "simple")
    return raw


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


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """An integer in [lo, hi], both included (Python's random.randint)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _choice(options, generator: torch.Generator | None):
    return options[_randint(0, len(options) - 1, generator)]


def simple_degrade(
    hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Per image: blur (random sigma), downscale by `scale` (random filter), noise, JPEG (random quality)."""
    out = []
    for img in hr:
        x = img[None].float()
        sigma = _uniform(cfg.simple_blur_sigma, generator)
        x = gaussian_blur(x, 2 * int(3 * sigma) + 1, sigma)
        x = downsample(x, scale, _choice(cfg.simple_resize_modes, generator))
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        x = x + _uniform(cfg.simple_noise_std, generator) * noise
        out.append(_jpeg(x[0], int(round(_uniform(cfg.simple_jpeg_quality, generator)))))
    return torch.stack(out).to(hr.dtype)


# --- BSR (BSRGAN) ---------------------------------------------------------------------------------
def anisotropic_kernel(size: int, theta: float, l1: float, l2: float, shift: float = 0.0) -> torch.Tensor:
    """(size, size) Gaussian with covariance V diag(l1, l2) V^T, V the rotation by theta, centred
    `shift` pixels right and down of the middle; sum 1 (BSRGAN's anisotropic_Gaussian)."""
    v = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    cov = v @ torch.diag(torch.tensor([max(l1, 1e-6), max(l2, 1e-6)], dtype=torch.float64)) @ v.T
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2 - shift
    grid = torch.stack(torch.meshgrid(r, r, indexing="xy"), dim=-1)  # (y, x) -> (x, y) offsets
    k = torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", grid, torch.linalg.inv(cov), grid))
    return (k / k.sum()).float()


def _blur_choice(sf: int, generator: torch.Generator | None) -> dict[str, Any]:
    """BSRGAN's add_blur: half the time an anisotropic kernel (eigenvalues up to 4 + sf), else an
    isotropic one (sigma up to 2 + 0.2 sf); odd sizes 7..25."""
    size = 2 * _randint(2, 11, generator) + 3
    if _uniform((0, 1), generator) < 0.5:
        wd2 = 4.0 + sf
        theta = math.pi * _uniform((0, 1), generator)
        l1, l2 = wd2 * _uniform((0, 1), generator), wd2 * _uniform((0, 1), generator)
        return {"op": "blur", "size": size, "theta": theta, "l1": l1, "l2": l2}
    sigma = (2.0 + 0.2 * sf) * _uniform((0, 1), generator)
    return {"op": "blur", "size": size, "theta": 0.0, "l1": sigma**2, "l2": sigma**2}


def _noise_choice(cfg: DegradationConfig, generator: torch.Generator | None) -> dict[str, Any]:
    """BSRGAN's add_Gaussian_noise: std of `level`/255; 40% color, 40% gray, 20% channel-correlated
    (covariance |L^2 U^T D U| with L the largest level, D uniform diagonal, U a random orthonormal basis)."""
    lo, hi = cfg.bsr_noise_levels
    level = _randint(lo, hi, generator) / 255.0
    r = _uniform((0, 1), generator)
    if r > 0.6:
        return {"op": "noise", "kind": "color", "std": level}
    if r < 0.4:
        return {"op": "noise", "kind": "gray", "std": level}
    d = torch.diag(torch.rand(3, generator=generator, dtype=torch.float64))
    u = torch.linalg.svd(torch.rand(3, 3, generator=generator, dtype=torch.float64))[0]
    cov = ((hi / 255.0) ** 2 * (u.T @ d @ u)).abs()
    return {"op": "noise", "kind": "correlated", "cov": cov.tolist()}


def bsr_plan(scale: int, cfg: DegradationConfig, generator: torch.Generator | None) -> list[dict[str, Any]]:
    """The random choices of one BSR degradation by `scale`, as the list of operations to apply."""
    plan: list[dict[str, Any]] = []
    sf = scale
    if scale == 4 and _uniform((0, 1), generator) < cfg.bsr_half_first_prob:
        plan.append({"op": "resize", "factor": 2.0, "mode": _choice(RESIZE_MODES, generator)})
        sf = 2
    order = torch.randperm(6, generator=generator).tolist()  # BSRGAN's 7th step (camera ISP) left out
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # the random downscale comes before the resize to the final size
        order[i2], order[i3] = 3, 2
    for step in order:
        if step in (0, 1):
            plan.append(_blur_choice(sf, generator))
        elif step == 2:
            if _uniform((0, 1), generator) < 0.75:
                factor = _uniform((1, 2 * sf), generator)
                plan.append({"op": "resize", "factor": factor, "mode": _choice(RESIZE_MODES, generator), "mark": True})
            else:
                sigma = _uniform((0.1, 0.6 * sf), generator)
                plan.append({"op": "shifted_blur_subsample", "sigma": sigma, "sf": sf, "mark": True})
        elif step == 3:
            plan.append({"op": "resize_from_mark", "divisor": sf, "mode": _choice(RESIZE_MODES, generator)})
        elif step == 4:
            plan.append(_noise_choice(cfg, generator))
        elif _uniform((0, 1), generator) < cfg.bsr_jpeg_prob:
            plan.append({"op": "jpeg", "quality": _randint(*cfg.bsr_jpeg_quality, generator)})
    plan.append({"op": "jpeg", "quality": _randint(*cfg.bsr_jpeg_quality, generator)})
    return plan


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)  # cv2 does not antialias


def _convolve(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) with a (K, K) kernel, mirrored at the borders (replicated where too small)."""
    pad = k.shape[-1] // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    c = x.shape[1]
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), k.to(x)[None, None].expand(c, 1, *k.shape), groups=c)


def apply_plan(x: torch.Tensor, plan: list[dict[str, Any]], generator: torch.Generator | None) -> torch.Tensor:
    """Carry out a bsr_plan on one (1, 3, H, W) image in [0, 1]; noise draws come from `generator`."""
    mark = x.shape[-2:]
    for step in plan:
        op = step["op"]
        if step.get("mark"):
            mark = x.shape[-2:]
        if op == "blur":
            x = _convolve(x, anisotropic_kernel(step["size"], step["theta"], step["l1"], step["l2"]))
        elif op == "resize":
            h, w = x.shape[-2:]
            x = _resize(x, (int(h / step["factor"]), int(w / step["factor"])), step["mode"])
        elif op == "shifted_blur_subsample":  # a kernel aligned with the kept pixels, then every sf-th pixel
            sf = step["sf"]
            k = anisotropic_kernel(25, 0.0, step["sigma"] ** 2, step["sigma"] ** 2, shift=(sf - 1) / 2)
            x = _convolve(x, k)[..., ::sf, ::sf]
        elif op == "resize_from_mark":
            x = _resize(x, (int(mark[0] / step["divisor"]), int(mark[1] / step["divisor"])), step["mode"])
        elif op == "noise":
            x = x + _noise(x.shape, step, generator).to(x)
        elif op == "jpeg":
            x = (_jpeg(x[0].clamp(0, 1) * 2 - 1, step["quality"])[None] + 1) / 2
        x = x.clamp(0, 1)
    return x


def _noise(shape: torch.Size, step: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
    b, c, h, w = shape
    if step["kind"] == "color":
        return step["std"] * torch.randn(b, c, h, w, generator=generator)
    if step["kind"] == "gray":
        return step["std"] * torch.randn(b, 1, h, w, generator=generator).expand(b, c, h, w)
    eigenvalues, vectors = torch.linalg.eigh(torch.tensor(step["cov"], dtype=torch.float64))
    root = vectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ vectors.T  # |cov| may not be PSD
    z = torch.randn(b, h, w, c, generator=generator, dtype=torch.float64)
    return (z @ root.T).permute(0, 3, 1, 2).float()


def bsr_degrade(
    hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Per image: a fresh bsr_plan, applied in [0, 1]. Random choices come from `generator` (a CPU
    generator), or from torch's global RNG when None."""
    out = []
    for img in hr:
        x = (img[None].detach().float().cpu() + 1) / 2
        out.append(apply_plan(x, bsr_plan(scale, cfg, generator), generator)[0] * 2 - 1)
    return torch.stack(out).to(hr.device, hr.dtype)


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
    if cfg.kind == "simple":
        return simple_degrade(hr, scale, cfg, generator).clamp(-1, 1)
    return bsr_degrade(hr, scale, cfg, generator).clamp(-1, 1)
