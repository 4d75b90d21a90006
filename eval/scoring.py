"""Scoring an image set: feature statistics (reduced across ranks), CLIP score, caption following,
and the distances between two sets. Real-image statistics are cached under evals/_cache/, keyed by
everything that makes them (data, count, resolution, each extractor with its weights and resize)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from eval import preempt
from eval.config import EvalJob
from eval.data import HeldOut
from eval.features import ClipFeatures
from train.distributed import all_gather_object, all_reduce_many, barrier, get_rank, get_world_size, is_main
from unclip.frechet import GaussianStats, frechet_distance


class Scorer:
    """Feature statistics, CLIP scores and caption-following counts of one image set on one rank."""

    def __init__(
        self,
        extractors: dict[str, Any],
        score_clip: ClipFeatures | None = None,
        keep_features: bool = False,
        shapes: tuple[str, ...] | None = None,
    ):
        self.extractors = extractors
        self.shapes = shapes  # the synthetic shapes the captions name: what the following reader picks from
        self.stats = {name: GaussianStats(ex.dim) for name, ex in extractors.items()}
        self.features: dict[str, list[torch.Tensor]] = {name: [] for name in extractors} if keep_features else {}
        self.score_clip = score_clip
        self.clip_sum = torch.zeros(2, dtype=torch.float64)  # sum of scores, count
        self.follow = torch.zeros(5, dtype=torch.float64)  # background, color, shape, all, images
        self.images = torch.zeros(1, dtype=torch.float64)

    @property
    def count(self) -> int:
        return int(self.images.item())

    def update(self, images: torch.Tensor, captions: list[str] | None) -> None:
        self.images += len(images)
        for name, extract in self.extractors.items():
            features = extract(images)
            self.stats[name].update(features)
            if name in self.features:
                self.features[name].append(features.float())
        if captions is not None and self.score_clip is not None:
            cos = (self.score_clip(images) * self.score_clip.text(captions)).sum(-1)
            self.clip_sum += torch.tensor([float((100 * cos.clamp(min=0)).sum()), float(len(cos))], dtype=torch.float64)
        if captions is not None and self.shapes:
            self._following(images, captions)

    def _following(self, images: torch.Tensor, captions: list[str]) -> None:
        from data.following import parse_caption, score

        pairs = [(im, c) for im, c in zip(images, captions) if parse_caption(c)]
        if pairs:
            pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im, _ in pairs]
            r = score(pil, [c for _, c in pairs], self.shapes)
            n = r["images"]
            self.follow += torch.tensor([r["background"] * n, r["color"] * n, r["shape"] * n, r["all"] * n, n])

    def reduce(self) -> Scorer:
        sums = [t for stats in self.stats.values() for t in stats.tensors]
        all_reduce_many([*sums, self.clip_sum, self.follow, self.images])  # one collective, staged for NCCL
        for name, parts in self.features.items():
            mine = torch.cat(parts) if parts else torch.zeros(0, self.extractors[name].dim)
            self.features[name] = [torch.cat([t for t in all_gather_object(mine) if len(t)])]
        return self


# --- the pieces ---------------------------------------------------------------------------------------
def real_scorer(job: EvalJob, heldout: HeldOut, indices: list[int], resolution: int, extractors, tag: str):
    """Statistics of the real images, from the cache when an earlier eval made the same ones."""
    key = _real_key(job, resolution, extractors, tag, heldout.set_id(range(job.data.count)))
    path = Path(job.cache_dir) / f"real-{key}.npz"
    names = sorted(extractors)
    files = {name: path.with_name(f"real-{key}-{name}.npz") for name in names}
    keep = job.eval.kid
    if all(f.is_file() for f in files.values()) and not keep:
        scorer = Scorer({})
        scorer.stats = {name: GaussianStats.load(f) for name, f in files.items()}
        return scorer, True
    scorer = Scorer(extractors, keep_features=keep)
    for batch, _ in stream_batches(heldout.real_images(indices, resolution), job.eval.batch_size, heldout.captions):
        scorer.update(batch, None)
    scorer.reduce()
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        for name, f in files.items():
            scorer.stats[name].save(f)
        f = path.with_suffix(".json")
        fields = _real_key_fields(job, resolution, extractors, tag, heldout.set_id(range(job.data.count)))
        f.write_text(json.dumps(fields, indent=2))
    barrier()
    return scorer, False


def _real_key_fields(job: EvalJob, resolution: int, extractors, tag: str, images: str) -> dict[str, Any]:
    """What makes a set of real statistics: the source, exactly which images (a hash of their ids), the
    resolution and each extractor."""
    d = job.data
    source = {"coco": str(Path(d.coco).resolve()), "seed": d.seed} if d.coco else {"shards": d.shards}
    return source | {
        "set": tag,
        "images": images,
        "count": d.count,
        "caption_key": d.caption_key,
        "resolution": resolution,
        "extractors": {name: ex.name for name, ex in sorted(extractors.items())},
    }


def _real_key(job, resolution, extractors, tag, images: str) -> str:
    fields = json.dumps(_real_key_fields(job, resolution, extractors, tag, images), sort_keys=True)
    return hashlib.sha256(fields.encode()).hexdigest()[:16]


def stream_batches(items, size: int, captions: list[str]):
    """(uint8 (B, 3, R, R), captions) batches from (index, image) pairs."""
    images, caps = [], []
    for i, image in items:
        preempt.check()
        images.append(image)
        caps.append(captions[i])
        if len(images) == size:
            yield torch.stack(images), caps
            images, caps = [], []
    if images:
        yield torch.stack(images), caps


def distances(real: Scorer | None, fake: Scorer, kid: bool) -> dict[str, Any]:
    """Every number the two sets give: FD per extractor (and KID), the CLIP score and caption following
    of `fake` (distances need `real`; without a real set only the last two)."""
    out: dict[str, Any] = {}
    for name in fake.stats if real is not None else []:
        result = frechet_distance(real.stats[name].mean_cov(), fake.stats[name].mean_cov())
        out[name] = result.value
        out[f"{name}_sqrtm_error"] = result.sqrtm_error
        if kid and real.features.get(name) and fake.features.get(name):
            # KID (Binkowski et al. 2018) in the same features: unbiased at any sample size, where a
            # Frechet distance is biased upward by about tr(S)/n (a small eval's FD needs it beside)
            from torch_fidelity.metric_kid import kid_features_to_metric

            f1, f2 = real.features[name][0], fake.features[name][0]
            size = min(1000, len(f1), len(f2))
            kid_out = kid_features_to_metric(f1, f2, kid_subsets=100, kid_subset_size=size, verbose=False)
            key = "kid" if name == "fid" else "kid_clip"
            out[key] = float(kid_out["kernel_inception_distance_mean"])
            out[f"{key}_std"] = float(kid_out["kernel_inception_distance_std"])
    if fake.clip_sum[1] > 0:
        out["clip_score"] = float(fake.clip_sum[0] / fake.clip_sum[1])
    if fake.follow[4] > 0:
        n = float(fake.follow[4])
        out["following"] = {k: float(v) / n for k, v in zip(("background", "color", "shape", "all"), fake.follow[:4])}
    return out


def settings_for(job: EvalJob, guidance: float | None):
    s = replace(job.pipeline)
    if guidance is not None:
        s.decoder_guidance = guidance
    return s


def guidance_values(job: EvalJob) -> list[float | None]:
    return list(job.eval.guidance) if job.eval.guidance else [job.pipeline.decoder_guidance]


def tag_of(guidance: float | None) -> str:
    return "default" if guidance is None else f"guidance-{guidance:g}"


def rank_indices(n: int) -> list[int]:
    rank, world = get_rank(), get_world_size()
    return [i for i in range(n) if i % world == rank]
