"""Writing img2dataset-layout shards: NNNNN.tar holding KEY.jpg|png|webp, KEY.txt, KEY.json.

Each shard is written to a temporary name and renamed when complete, so a killed writer never
leaves a half shard under a real name, and a rerun rewrites only what is missing.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def shard_name(index: int) -> str:
    return f"{index:05d}.tar"


def encode_image(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} not supported; choose from {list(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("jpg", "webp") else {"compress_level": 1}
    image.save(buf, format=IMAGE_FORMATS[fmt], **kwargs)
    return buf.getvalue()


def json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def write_shard(path: Path, samples: Iterable[Sample]) -> int:
    """Write samples into the tar at `path` atomically; returns how many were written."""
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    mtime = time.time()
    with tarfile.open(tmp, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = mtime
                tar.addfile(info, io.BytesIO(data))
            count += 1
    if count == 0:
        tmp.unlink()
        return 0
    os.replace(tmp, path)
    return count


def run_shard_tasks(
    tasks: list[Any],
    fn: Callable[[Any], tuple[int, Counter]],
    workers: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, Counter]:
    """Run one shard-writing task per item, in `workers` processes; sum (written, skipped)."""
    written, skipped = 0, Counter()

    def account(result: tuple[int, Counter]) -> None:
        nonlocal written
        written += result[0]
        skipped.update(result[1])
        if progress:
            progress(result[0] + sum(result[1].values()))

    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            account(fn(task))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(fn, tasks):
                account(result)
    return written, skipped


def chunks(n_items: int, per_chunk: int) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, stop) covering range(n_items) in chunks of per_chunk."""
    if per_chunk <= 0:
        raise ValueError(f"samples per shard must be positive, got {per_chunk}")
    for i, start in enumerate(range(0, n_items, per_chunk)):
        yield i, start, min(n_items, start + per_chunk)
