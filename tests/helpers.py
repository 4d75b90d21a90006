"""Small builders for test inputs: shards with known content, damaged on purpose where asked."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Smooth random colors (JPEG-friendly): a coarse grid upsampled."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def clean_members(rng: np.random.Generator, keys: list[str], size: int = 32, fmt: str = "jpg"):
    """(members, {key: (caption, pixels)}) for a shard of good samples."""
    members, truth = [], {}
    for key in keys:
        pixels = random_image(rng, size)
        caption = f"caption of {key}"
        data = image_bytes(pixels, "JPEG", quality=95) if fmt == "jpg" else image_bytes(pixels, "PNG")
        members += [(f"{key}.{fmt}", data), (f"{key}.txt", caption.encode()), (f"{key}.json", b"{}")]
        truth[key] = (caption, pixels)
    return members, truth
