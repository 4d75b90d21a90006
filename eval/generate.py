"""Generating an eval's images, cached on disk so an interrupted eval resumes where it stopped.

    evals/<name>/generated/<tag>/NNNNNN_K.png    image K of held-out caption N, with its provenance

Caption N belongs to rank N mod world; image K of caption N has seed pipeline.seed + N * K_total + K,
so every image is the same at any world size or batch, and none is made twice or missed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval import preempt
from eval.config import EvalJob
from train.distributed import is_main


def generate(pipe, job: EvalJob, captions: list[str], indices: list[int], folder: Path, settings) -> int:
    """Write NNNNNN_K.png for this rank's captions, skipping what a previous run wrote; returns how
    many were made. Image K of caption N has seed pipeline.seed + N * K_total + K, so it is the same
    image on any world size and batch."""
    from unclip.provenance import image_record, save_png
    from unclip.sample import check_settings

    per = job.eval.images_per_caption
    check_settings(folder, pipe.describe(settings, "text") | {"images_per_caption": per})
    todo = [i for i in indices if not all((folder / _name(i, k)).is_file() for k in range(per))]
    group = max(1, settings.batch_size // per)
    made = 0
    bar = tqdm(total=len(todo), desc=f"generating {folder.name}", unit="caption", disable=not is_main() or None)
    for start in range(0, len(todo), group):
        preempt.check()  # between batches: every image on disk is whole
        part = todo[start : start + group]
        seeds = [settings.seed + i * per for i in part]
        out = pipe.text_to_image([captions[i] for i in part], per, settings=settings, seeds=seeds)
        for n, image in enumerate(out.images):
            i, k = part[n // per], n % per
            record = image_record(out.settings, out.records[n] | {"caption_index": i}, image.size)
            save_png(image, folder / _name(i, k), record, watermark=False)  # a watermark would move the metrics
            made += 1
        bar.update(len(part))
    bar.close()
    return made


def _name(i: int, k: int) -> str:
    return f"{i:06d}_{k}.png"


def read_generated(folder: Path, indices: list[int], per: int, size: int):
    """(caption index, uint8 (3, size, size)) for every generated image of these captions, read back
    from disk, so a resumed eval scores exactly the pixels an uninterrupted one would."""
    for i in indices:
        for k in range(per):
            path = folder / _name(i, k)
            if not path.is_file():
                raise FileNotFoundError(f"generated image {path} is missing")
            yield i, _load(path, size)


def external_images(folder: Path, rank: int, world: int, size: int):
    """Images made elsewhere (a peer's, an earlier eval's): every PNG / JPEG under `folder` with its
    caption from a same-named .txt, or from the unclip provenance it carries. Returns (this rank's
    (index, image) iterator, all captions)."""
    import json

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    captions, kept = [], []
    for path in paths:
        text = path.with_suffix(".txt")
        if text.is_file():
            caption = text.read_text().strip()
        else:
            record = _provenance_chunk(path)
            caption = json.loads(record).get("prompt") if record else None
        if caption:
            captions.append(caption)
            kept.append(path)
    if not kept:
        raise ValueError(f"no captioned images under {folder}: give each image a same-named .txt caption")
    mine = ((i, _load(p, size)) for i, p in enumerate(kept) if i % world == rank)
    return mine, captions


def _provenance_chunk(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get("unclip")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"model.generated: {path} is not a readable image ({e})") from None


def _load(path: Path, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"model.generated: {path} is not a readable image ({e})") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
