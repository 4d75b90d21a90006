"""The typed schema of `python -m eval` (conf/eval.yaml), registered in Hydra's ConfigStore.

The sampling knobs are unclip.pipeline.SampleSettings itself under `pipeline.`, so an eval's
`pipeline.decoder_guidance=3` means exactly what `python -m unclip.sample --decoder-guidance 3` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from eval.features import InceptionConfig
from unclip.settings import SampleSettings


@dataclass
class EvalData:
    """Where the held-out captions and real images come from: shards, MS-COCO, or nothing (generated
    images scored on their own captions, with no real set: CLIP score only)."""

    name: str = "heldout"  # names the real statistics' cache entry
    shards: str | None = None  # held-out shards (captions + real images), any spec the loader takes
    caption_key: str = "txt"  # txt, or json:<field>
    coco: str | None = None  # MS-COCO 2014 root: annotations/captions_val2014.json + val2014/
    count: int = 1000  # captions (and real images) scored
    seed: int = 0  # which captions, for sets drawn at random (COCO)
    resolution: int | None = None  # real images center-cropped and resized to this (default: the stack's output)


@dataclass
class StackPaths:
    """The stack to generate with (as python -m unclip.sample), or a folder of images made elsewhere."""

    stack: str | None = None  # runs folder or run-name prefix (runs/demo)
    prior: str | None = None
    decoder: str | None = None
    up256: str | None = None
    up1024: str | None = None
    clip: str | None = None
    generated: str | None = None  # score these images instead: NNNNNN_K.png (+ provenance or NNNNNN.txt)
    precision: str = "fp32"  # fp32 | bf16 (autocast)


@dataclass
class Metrics:
    images_per_caption: int = 1  # K generated images per caption
    fid: bool = True  # needs inception.weights (a local file)
    inception: InceptionConfig = field(default_factory=InceptionConfig)
    fd_clip: bool = True
    clip_score: bool = True
    kid: bool = False  # KID beside each Frechet distance (kid, kid_clip): unbiased at small n; keeps every feature
    # an independent CLIP for FD-CLIP and the CLIP score: an export folder, or a conf/model/clip preset with
    # its weights file (ViT-L-14:/m/vit.pt); `stack` or null: the stack's own CLIP (labelled not independent)
    score_clip: str | None = None
    following: bool = True  # synthetic captions: the fraction of images showing what they name
    real_vs_real: bool = False  # also score held-out images against another held-out sample (a floor)
    guidance: list[float] | None = None  # a decoder-guidance sweep in one run, reusing the real statistics
    batch_size: int = 32  # images through the extractors at a time
    grid_pairs: int = 8  # real-vs-generated pairs in the report's grid


@dataclass
class EvalLogger:
    wandb: str = "disabled"  # disabled | offline | online: the report's numbers and grid as one wandb run
    project: str = "unclip"
    entity: str | None = None


@dataclass
class EvalJob:
    name: str = MISSING  # evals/<name>/ holds the images, features and the report
    evals_dir: str = "evals"
    cache_dir: str = "evals/_cache"  # real-image statistics, shared by every eval
    data: EvalData = field(default_factory=EvalData)
    model: StackPaths = field(default_factory=StackPaths)
    pipeline: SampleSettings = field(default_factory=SampleSettings)
    eval: Metrics = field(default_factory=Metrics)
    logger: EvalLogger = field(default_factory=EvalLogger)

    @property
    def out_dir(self) -> Path:
        return Path(self.evals_dir) / self.name

    def validate(self) -> None:
        """What composing cannot check: counts, and every sampling knob finite and in range (a NaN
        guidance would score black images without a word)."""
        if self.data.count < 1:
            raise ValueError(f"data.count must be at least 1 (captions to score), got {self.data.count}")
        if self.eval.images_per_caption < 1:
            raise ValueError(f"eval.images_per_caption must be at least 1, got {self.eval.images_per_caption}")
        if self.eval.batch_size < 1:
            raise ValueError(f"eval.batch_size must be at least 1, got {self.eval.batch_size}")
        self.pipeline.validate(name=lambda field: f"pipeline.{field}")
        for value in self.eval.guidance or []:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"eval.guidance values must be finite numbers >= 0, got {value}")


ConfigStore.instance().store(name="eval_job", node=EvalJob)
