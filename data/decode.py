"""Turning a raw shard sample (bytes by extension) into pixels and a caption, or a counted skip.

Every way a sample can be bad has a reason name; the loader counts skips by reason so the trainer
can log them. Images in any PIL mode are converted to 8-bit RGB where that is meaningful
(grayscale, palette, alpha over white, CMYK, 16-bit); anything else is skipped, never fatal.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Decompression bombs are bad input, not a reason to stop: PIL raises and we count it.
Image.MAX_IMAGE_PIXELS = 200_000_000


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is recorded under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def find_image(raw: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in raw:
            return raw[ext]
    raise SkipSample("missing_image")


def get_caption(raw: dict, caption_key: str = "txt") -> str:
    """The caption from KEY.txt, or from a field of KEY.json with caption_key="json:<field>"."""
    if caption_key.startswith("json:"):
        field = caption_key[5:]
        if "json" not in raw:
            raise SkipSample("missing_caption", "no json")
        try:
            value = json.loads(raw["json"]).get(field)
        except (ValueError, AttributeError) as e:
            raise SkipSample("bad_json", str(e)) from e
        if value is None:
            raise SkipSample("missing_caption", f"json has no {field!r}")
        text = str(value)
    else:
        if caption_key not in raw:
            raise SkipSample("missing_caption")
        try:
            text = raw[caption_key].decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("bad_caption_encoding", str(e)) from e
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption")
    return text


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale PNGs decode to I;16 or I; values span 0..65535: scale, do not clip to 255.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    raise SkipSample("unsupported_mode", mode)


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image. With `min_side`, JPEGs decode at the smallest DCT scale that keeps
    the shorter side >= min_side (PIL draft mode): the fast path for large photos into small crops."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd metadata; the pixels decide
            image = Image.open(io.BytesIO(data))
            if min_side and image.format == "JPEG":
                w, h = image.size
                scale = min_side / min(w, h)
                if scale < 1:
                    image.draft("RGB", (int(w * scale + 1), int(h * scale + 1)))
            image.load()
    except SkipSample:
        raise
    except Exception as e:  # truncated, garbled, unknown format, decompression bomb
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from e
    return to_rgb(image)


def resize_crop(image: Image.Image, resolution: int, crop: str, rng: np.random.Generator | None) -> np.ndarray:
    """Shorter side to `resolution`, then a square crop (center, or random with `rng`) -> (H, W, 3) uint8."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1:
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
        w, h = nw, nh
    if crop == "random" and rng is not None:
        left = int(rng.integers(0, w - resolution + 1))
        top = int(rng.integers(0, h - resolution + 1))
    elif crop in ("center", "random"):
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)
