"""Turning a raw shard sample (bytes by extension) into pixels and a caption, or a counted skip.

Every way a sample can be bad has a reason name; the loader counts skips by reason so the trainer
can log them. Images in any PIL mode are converted to 8-bit RGB where that is meaningful
(grayscale, palette, alpha over white, CMYK, 16-bit); anything else is skipped, never fatal.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
from PIL import Image

try:  # libjpeg-turbo with its corrupt-data warnings as errors; without it PIL decodes every JPEG
    import simplejpeg
except ImportError:  # pragma: no cover - a core dependency; kept optional for odd platforms
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
JPEG_SOI = b"\xff\xd8"
# Images larger than this (decoded pixels, after a JPEG's draft scaling) are skipped as too_large
# before they are decoded: an 18000^2 PNG of a few hundred KB would cost 1.3 GB and seconds per read.
# data.max_image_pixels sets it for training; PIL's own bomb check stays as the backstop.
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000
Image.MAX_IMAGE_PIXELS = 200_000_000  # beyond 2x this PIL refuses at open: counted as corrupt_image


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


def decode_image(data: bytes, min_side: int | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image. With `min_side`, JPEGs decode at the smallest DCT scale that keeps
    the shorter side >= min_side (PIL draft mode): the fast path for large photos into small crops.

    Sizes are checked from the header before anything is decoded (check_size): an image that would
    decode to more than `max_pixels`, or whose shorter side brought to `min_side` would, is skipped as
    too_large, unread. JPEGs go through libjpeg-turbo in strict mode (simplejpeg), so what libjpeg
    only warns about (garbled scan data, a premature end) is a corrupt_image too: PIL would decode
    those to a damaged picture without a word. CMYK / YCCK JPEGs are checked that way, then decoded by
    PIL (which knows Adobe's inverted CMYK); other formats go through PIL."""
    if simplejpeg is not None and data[:2] == JPEG_SOI:
        image = _decode_jpeg_strict(data, min_side, max_pixels)
        if image is not None:
            return image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd metadata; the pixels decide
            image = Image.open(io.BytesIO(data))  # reads the header only
            check_size(image.width, image.height, min_side, max_pixels)
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


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image's header, nothing decoded; an unreadable header is a corrupt_image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception as e:  # unknown format, truncated header, decompression bomb
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from e


def check_size(width: int, height: int, min_side: int | None, max_pixels: int | None) -> None:
    """What decoding (and resizing the shorter side to `min_side`) would cost, from the header alone:
    too_large when either holds more than `max_pixels`. A 372-byte PNG can claim 100000x1; brought to
    a 128 px shorter side it would be 12.8M x 128."""
    if width < 1 or height < 1:
        raise SkipSample("corrupt_image", f"{width}x{height} pixels")
    if not max_pixels:
        return
    if width * height > max_pixels:
        raise SkipSample("too_large", f"{width}x{height} > {max_pixels} pixels")
    if min_side and min(width, height) < min_side:  # an upscale: the resized image is the larger one
        scale = min_side / min(width, height)
        w, h = math.ceil(width * scale), math.ceil(height * scale)
        if w * h > max_pixels:
            raise SkipSample("too_large", f"{width}x{height} resized to a {min_side} px side would be {w}x{h}")


def _decode_jpeg_strict(data: bytes, min_side: int | None, max_pixels: int | None) -> Image.Image | None:
    """RGB from a JPEG through simplejpeg (strict), DCT-scaled like PIL's draft; None to leave it to PIL."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise SkipSample("corrupt_image", f"JPEG header: {e}") from e
    check_size(w, h, min_side, max_pixels)
    scale = min(1.0, min_side / min(w, h)) if min_side else 1.0
    eighths = max(1, math.ceil(scale * 8))  # libjpeg scales by n/8
    if colorspace in ("CMYK", "YCCK"):
        try:  # libjpeg's verdict on the scan data; PIL then decodes the pixels (Adobe's inverted CMYK)
            simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True)
        except ValueError as e:
            raise SkipSample("corrupt_image", f"CMYK JPEG: {e}") from e
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    if max_pixels and math.ceil(w * eighths / 8) * math.ceil(h * eighths / 8) > max_pixels:
        raise SkipSample("too_large", f"{w}x{h} > {max_pixels} pixels")
    shorter = {"min_height": min_side} if h <= w else {"min_width": min_side}
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **(shorter if min_side else {}))
    except ValueError as e:  # libjpeg's errors, and in strict mode its corrupt-data warnings
        raise SkipSample("corrupt_image", f"JPEG: {e}") from e
    return Image.fromarray(pixels, "RGB")


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
