"""Images and masks in and out of the generation pipeline.

Inside, an image is a float tensor (B, 3, H, W) in [-1, 1] and a mask is (B, 1, H, W) with 1 where
the image is known (kept) and 0 where it is to be painted. Outside, images are files, PIL images,
numpy arrays or tensors; mask files follow the editors' conventions: white paints, black keeps
(diffusers), or, when the mask has transparency, transparent paints (DALL-E's editor).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


# The largest input image (or mask) the pipeline takes, checked from the header before decoding: an
# edit works at the input's size, in float, several copies deep, so this bounds what one call costs
# (4096^2 pixels: ~200 MB per float copy). Larger images are refused with a line saying so.
MAX_INPUT_PIXELS = 4096 * 4096


def _open(source: ImageLike, what: str = "image") -> Image.Image:
    if isinstance(source, str | os.PathLike):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no {what} at {source}")
        return open_checked(source, f"{what} {source}")
    if isinstance(source, np.ndarray):
        check_input_size(source.shape[1] if source.ndim > 1 else 1, source.shape[0], f"{what} array")
        return Image.fromarray(source)
    check_input_size(source.width, source.height, what)
    return source


class ImageTooLarge(ValueError):
    """An image over MAX_INPUT_PIXELS by its header, or one PIL refuses to decode as a bomb."""


def open_checked(fp, what: str, check_header: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """Decode an image file (a path or a binary file object) only after its header passed: at most
    MAX_INPUT_PIXELS (ImageTooLarge), then `check_header(image)` if given. An unreadable file is a
    ValueError naming `what`. The one checked decode of the pipeline's inputs and the server's uploads."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is below
            with Image.open(fp) as im:  # the header only, so far
                check_input_size(im.width, im.height, what)
                if check_header is not None:
                    check_header(im)
                im.load()
                return im.copy()
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{what} is too large to decode ({e})") from None
    except OSError as e:
        raise ValueError(f"{what} is not a readable image: {e}") from None


def check_input_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise ImageTooLarge(
            f"{what} is {width}x{height} ({width * height / 1e6:.1f}M pixels); the pipeline takes images of at "
            f"most {MAX_INPUT_PIXELS / 1e6:.1f}M pixels (4096x4096): downscale it first"
        )


def load_image(source: ImageLike) -> torch.Tensor:
    """Any image -> (1, 3, H, W) float in [-1, 1]. Transparency is composited over white; a tensor
    is taken as it is ((3, H, W) or (1, 3, H, W), in [-1, 1])."""
    if isinstance(source, torch.Tensor):
        x = source.detach().float()
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"an image tensor is (3, H, W) or (1, 3, H, W), got {tuple(source.shape)}")
        check_input_size(x.shape[-1], x.shape[-2], "image tensor")
        return x.clamp(-1, 1)
    im = _open(source)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def load_mask(source: ImageLike, size: tuple[int, int]) -> torch.Tensor:
    """A mask -> (1, 1, H, W) float, 1 = keep, 0 = paint, at `size` (H, W).

    Files and PIL images: with transparency, transparent pixels are painted (DALL-E's editor);
    otherwise white (luminance > 127) is painted and black kept (diffusers' convention). Tensors and
    arrays are taken as they are, in this module's convention (1 = keep)."""
    if isinstance(source, torch.Tensor | np.ndarray):
        keep = torch.as_tensor(np.asarray(source), dtype=torch.float32)
        while keep.ndim < 4:
            keep = keep[None]
    else:
        im = _open(source, "mask")
        if im.mode in ("RGBA", "LA", "PA") and np.asarray(im.getchannel("A")).min() < 255:
            keep = torch.from_numpy(np.asarray(im.getchannel("A")) > 127)
        else:
            keep = torch.from_numpy(np.asarray(im.convert("L")) <= 127)
        keep = keep.float()[None, None]
    if tuple(keep.shape[-2:]) != tuple(size):
        # stretching would move the edit's edges without a word: the caller decides how to fit it
        (mh, mw), (h, w) = keep.shape[-2:], size
        raise ValueError(f"the mask is {mw}x{mh} but the image is {w}x{h}: give a mask of the image's size")
    if keep.min() > 0:
        raise ValueError("the mask keeps the whole image: nothing to paint (white or transparent marks the region)")
    return keep


def box_mask(size: tuple[int, int], box: Sequence[int]) -> torch.Tensor:
    """(1, 1, H, W) mask that paints the box (left, top, right, bottom) in pixels and keeps the rest."""
    h, w = size
    left, top, right, bottom = (int(v) for v in box)
    if not (0 <= left < right <= w and 0 <= top < bottom <= h):
        raise ValueError(f"box {tuple(box)} is not inside the {w}x{h} image (left, top, right, bottom)")
    keep = torch.ones(1, 1, h, w)
    keep[..., top:bottom, left:right] = 0
    return keep


def square_crop(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> its centre square (..., S, S), S = min(H, W)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s]


def square_pad(x: torch.Tensor, value: float) -> torch.Tensor:
    """(..., H, W) -> a centred square (..., S, S), S = max(H, W), the rest filled with `value`."""
    h, w = x.shape[-2:]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return F.pad(x, (left, s - w - left, top, s - h - top), value=value)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images to (H, W): antialiased bicubic, clamped to [-1, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def resize_mask(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A keep-mask at another size, conservative: a pixel is known only if all it covers is known."""
    if tuple(keep.shape[-2:]) == tuple(size):
        return keep
    covered = F.interpolate(keep.float(), size=size, mode="area")
    return (covered > 0.999).float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 [0, 255], rounded the way every image writer here rounds."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def feather(keep: torch.Tensor, pixels: int) -> torch.Tensor:
    """A soft keep-weight: 1 on every kept pixel, falling linearly to 0 over `pixels` into the
    painted region, so a paste leaves no seam and still keeps the kept pixels exactly."""
    keep = keep.float()
    if pixels <= 0:
        return keep
    grown = [keep] + [F.max_pool2d(keep, 2 * k + 1, stride=1, padding=k) for k in range(1, pixels + 1)]
    return torch.stack(grown).mean(dim=0) * (1 - keep) + keep


def paste(original: torch.Tensor, generated: torch.Tensor, keep: torch.Tensor, pixels: int = 4) -> torch.Tensor:
    """uint8 images (B, 3, H, W): the original where kept, exactly; the generated elsewhere, blended
    with the original over a `pixels`-wide feather inside the painted region."""
    weight = feather(keep, pixels)
    blend = weight * original.float() + (1 - weight) * generated.float()
    out = blend.round().clamp(0, 255).to(torch.uint8)
    return torch.where(keep.bool().expand_as(out), original.expand_as(out), out)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (B, 3, H, W) -> PIL images."""
    return [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
