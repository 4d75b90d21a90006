"""The held-out set an eval scores against: captions and real images, from shards or from MS-COCO.

Every rank reads the same list of captions (cheap) and decodes only its own share of real images
(caption i belongs to rank i mod world), so no image is counted twice or missed at any world size.

MS-COCO (the unCLIP / GLIDE / DALL-E protocol): `count` validation images drawn with a fixed seed from
`annotations/captions_val2014.json`, one of each image's captions drawn with the same seed; the real
images are center-cropped to a square and resized to the evaluation resolution (256 in the paper).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.decode import SkipSample, decode_image, find_image, get_caption, resize_crop
from data.loader import iter_raw_samples, list_shards
from eval.config import EvalData

COCO_CAPTIONS = "annotations/captions_val2014.json"


@dataclass
class HeldOut:
    captions: list[str]
    sources: list  # per caption: the raw sample (shards) or the image path (COCO) it came from
    kind: str  # shards | coco
    skipped: Counter
    ids: list[str] = field(default_factory=list)  # per caption: what identifies its image (shard#key, file name)

    def set_id(self, indices: range | list[int]) -> str:
        """A hash of exactly which images `indices` are: what the cache of real statistics is keyed on."""
        return hashlib.sha256("\n".join(self.ids[i] for i in indices).encode()).hexdigest()[:16]

    def real_images(self, indices: list[int], resolution: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, uint8 (3, R, R)) for each index: center crop, shorter side to R. An image that does
        not decode is skipped and counted in `skipped`, as training skips it."""
        for i in indices:
            source = self.sources[i]
            if self.kind == "coco":
                try:
                    with Image.open(source) as im:
                        image = im.convert("RGB")
                except OSError as e:
                    raise ValueError(f"COCO image {source} cannot be read: {e}") from e
            else:
                try:
                    image = decode_image(find_image(source), min_side=resolution)
                except SkipSample as e:
                    self.skipped[e.reason] += 1
                    continue
            pixels = resize_crop(image, resolution, "center", None)
            yield i, torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def load_heldout(cfg: EvalData, mine: Callable[[int], bool] = lambda i: True) -> HeldOut:
    """Every caption; the image source only for the indices `mine` keeps (this rank's share)."""
    if cfg.coco and cfg.shards:
        raise ValueError("eval data: give data.shards or data.coco, not both")
    if cfg.coco:
        return _coco(Path(cfg.coco), cfg.count, cfg.seed)
    if cfg.shards:
        return _shards(cfg.shards, cfg.count, cfg.caption_key, mine)
    raise ValueError("eval data: set data.shards (held-out shards) or data.coco (an MS-COCO 2014 root)")


def _shards(spec: str, count: int, caption_key: str, mine: Callable[[int], bool]) -> HeldOut:
    """The first `count` usable samples of the shards, in order (bad ones skipped and counted)."""
    captions, sources, ids, skipped = [], [], [], Counter()
    for url in list_shards(spec):
        for raw in iter_raw_samples(url, skipped):
            try:
                find_image(raw)
                captions.append(get_caption(raw, caption_key))
            except SkipSample as e:
                skipped[e.reason] += 1
                continue
            ids.append(f"{raw.get('__url__')}#{raw.get('__key__')}")
            sources.append(raw if mine(len(sources)) else None)  # other ranks' images are not kept
            if len(captions) == count:
                return HeldOut(captions, sources, "shards", skipped, ids)
    if not captions:
        raise ValueError(f"no usable held-out sample in {spec} (skipped: {dict(skipped)})")
    raise ValueError(
        f"{spec} has {len(captions)} usable held-out samples, fewer than data.count={count}: lower data.count"
    )


def _coco(root: Path, count: int, seed: int) -> HeldOut:
    path = root / COCO_CAPTIONS
    if not path.is_file():
        raise FileNotFoundError(
            f"no {COCO_CAPTIONS} under {root}: data.coco is the MS-COCO 2014 root holding annotations/ and val2014/"
        )
    meta = json.loads(path.read_text())
    by_image: dict[int, list[str]] = {}
    for ann in meta["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann["caption"].strip())
    images = sorted((img for img in meta["images"] if int(img["id"]) in by_image), key=lambda img: int(img["id"]))
    if count > len(images):
        raise ValueError(f"{path} has {len(images)} captioned images, fewer than data.count={count}")
    # one shuffled order of every image and a caption chosen for each, so the first N of a draw are the
    # same whatever count asks for (real_vs_real's second sample extends the first, never redraws it)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    picks = rng.integers(0, 1 << 30, size=len(images))
    captions, sources, ids = [], [], []
    for k in order[:count]:
        image = images[int(k)]
        options = by_image[int(image["id"])]
        captions.append(options[int(picks[k]) % len(options)])
        sources.append(root / "val2014" / image["file_name"])
        ids.append(image["file_name"])
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} chosen COCO images are missing, e.g. {missing[0]}")
    return HeldOut(captions, sources, "coco", Counter(), ids)
