"""What the prior and the decoder both take from a batch: pixels, CLIP image embeddings, caption
encodings; and the check that precomputed embeddings come from the CLIP in use."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from data.embeddings import EmbeddingStore
from data.loader import DataConfig
from unclip.clip import ClipConfig, ClipEncoder
from unclip.export import read_export_config
from unclip.sample import caption_lines


def pixels(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The batch's uint8 images as floats in [-1, 1]."""
    return batch["image"].to(device, non_blocking=True).float() / 127.5 - 1


def read_at_clip_resolution(data: DataConfig, clip: ClipEncoder, at_least: int = 0) -> DataConfig:
    """The data the loaders read when the frozen CLIP embeds images in the loop: at CLIP's input
    resolution, as data.embed reads them, not smaller (CLIP would embed an upsampled, blurry image);
    at `at_least` where the task trains on larger images."""
    if data.embeddings or not data.load_images:
        return data
    return replace(data, resolution=max(clip.image_size[0], at_least))


@torch.no_grad()
def image_embeddings(batch: dict[str, Any], clip: ClipEncoder, device: torch.device) -> torch.Tensor:
    """(B, D) raw CLIP image embeddings: precomputed when the batch has them, else from the frozen CLIP."""
    if "img_emb" in batch:
        return batch["img_emb"].to(device).float()
    return clip.encode_image(pixels(batch, device)).float()


def read_prompts(path: str) -> list[str]:
    """Validation captions from task.sample_prompts, one per line (blank lines skipped)."""
    prompts = caption_lines(path, "task.sample_prompts")
    if not prompts:
        raise ValueError(f"task.sample_prompts={path} holds no captions")
    return prompts


def check_companion(folder: str, key: str, fingerprint: str, clip_cfg: ClipConfig, kind: str) -> None:
    """An export another task draws with (the decoder's task.prior, the prior's task.decoder) must have
    been trained with this task's CLIP: only the fingerprint tells two CLIPs of one width apart."""
    theirs = read_export_config(folder, kind=key).get("clip_fingerprint")
    if theirs is not None and theirs != fingerprint:
        raise ValueError(
            f"task.{key}={folder} was trained with CLIP {theirs}, but this {kind}'s CLIP "
            f"({clip_cfg.checkpoint or clip_cfg.arch}) is CLIP {fingerprint}: they do not share an embedding "
            f"space. Use the {key} trained with this CLIP."
        )


def check_embeddings(folder: str, clip: ClipEncoder, clip_cfg: ClipConfig) -> None:
    """Refuse embeddings that another CLIP made (data.embed records the CLIP's fingerprint)."""
    store = EmbeddingStore(folder)
    if store.embed_dim != clip.embed_dim:
        raise ValueError(
            f"{folder} holds {store.embed_dim}-d embeddings but model.clip makes "
            f"{clip.embed_dim}-d ones: they come from another CLIP"
        )
    made_by = (store.info or {}).get("fingerprint")
    mine = clip.fingerprint()
    if made_by is not None and made_by != mine:
        raise ValueError(
            f"{folder} was made by CLIP {made_by}, but model.clip is CLIP {mine} ({clip_cfg.arch}, checkpoint "
            f"{clip_cfg.checkpoint}). Point model.clip at the CLIP that made the embeddings, or recompute them: "
            "python -m data.embed --clip ..."
        )
