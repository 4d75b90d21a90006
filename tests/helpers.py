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


def png_header(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height (no pixel data): what a
    decompression bomb or a probe looks like before anything is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def garbled_scan(jpeg: bytes) -> bytes:
    """A JPEG whose entropy-coded data is overwritten after the start of scan: PIL decodes it to a
    damaged picture without a word; libjpeg warns "Corrupt JPEG data"."""
    data = bytearray(jpeg)
    sos = data.find(b"\xff\xda")
    data[sos + 40 : sos + 120] = b"\x55" * 80
    return bytes(data)
