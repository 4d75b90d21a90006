"""CLIP, as the rest of unCLIP sees it: a thin wrapper over open_clip.

The prior reads the text encoder's per-token outputs and pooled embedding; the decoder reads the
image embedding; data.embed precomputes both. Images come in as pixels in [-1, 1] (the diffusion
models' range) and are resized and normalized here with the model's own statistics, so no caller
needs to know a CLIP's preprocessing.

Weights are never fetched behind the user's back: `checkpoint` (a local file, or a `train.clip`
export folder) wins; a `pretrained` tag (an open_clip download) is used only with `allow_download`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from unclip.export import CONFIG as EXPORT_CONFIG
from unclip.export import WEIGHTS as EXPORT_WEIGHTS
from unclip.export import read_export_config, refused_pickle, write_export
from unclip.images import square_crop, square_pad
from unclip.records import RecordError, check_record, check_value, from_record


@dataclass
class ClipConfig:
    arch: str = "custom"  # an open_clip model name ("ViT-L-14") or "custom" (then model_cfg is the config)
    model_cfg: dict[str, Any] | None = None  # open_clip config: embed_dim, vision_cfg, text_cfg
    pretrained: str | None = None  # open_clip tag ("openai", "laion2b_s32b_b79k"): a download
    checkpoint: str | None = None  # local weights file or train.clip export folder; wins over pretrained
    allow_download: bool = False  # let open_clip fetch `pretrained` (compute nodes are often offline)
    quick_gelu: bool = False  # OpenAI's weights were trained with QuickGELU
    context_length: int | None = None  # tokens per caption; None keeps the model's own
    frozen: bool = True  # the prior and decoder use CLIP frozen; train.clip sets False
    extra: dict[str, Any] = field(default_factory=dict)  # further open_clip.create_model kwargs


class TextEncoding(NamedTuple):
    tokens: torch.Tensor  # (B, T, W) final-layer token outputs (after ln_final, before projection)
    mask: torch.Tensor  # (B, T) True where a real token (up to and including end-of-text)
    embedding: torch.Tensor  # (B, E) pooled and projected: the CLIP text embedding (not normalized)


class ClipEncoder(nn.Module):
    """An open_clip CLIP model with its tokenizer and preprocessing."""

    def __init__(self, model: nn.Module, tokenizer, config: ClipConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        pre = open_clip.get_model_preprocess_cfg(model)
        mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_size = _pair(model.visual.image_size)
        if config.frozen:
            self.requires_grad_(False)
            self.eval()

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of the joint image/text embedding space (768 for ViT-L/14)."""
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def text_width(self) -> int:
        """Width of the per-token text outputs."""
        return self.model.ln_final.normalized_shape[0]

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def train(self, mode: bool = True):
        # A frozen CLIP stays in eval mode whatever its parent does (no dropout, fixed statistics).
        return super().train(mode and not self.config.frozen)

    # --- encoders ------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, T) token ids on the model's device; long captions are truncated."""
        return self.tokenizer(list(captions)).to(self.pixel_mean.device)

    def encode_text(self, tokens: torch.Tensor) -> TextEncoding:
        """(B, T) token ids -> per-token outputs, their mask, and the pooled embedding.

        Mirrors open_clip's CLIP.encode_text, keeping the token outputs it discards."""
        m = self.model
        if not hasattr(m, "token_embedding"):
            raise ValueError(f"CLIP arch {self.config.arch!r} has a custom text tower; use a standard CLIP")
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)  # (B, T, W)
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id (open_clip "argmax" pool)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = m.text_projection
        embedding = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = positions[None, :] <= eot[:, None]
        return TextEncoding(tokens=x, mask=mask, embedding=embedding)

    def kept_words(self, caption: str) -> str | None:
        """None when the caption fits the context; else the part of it the CLIP reads (the tokenizer
        cuts it to context_length tokens, start and end of text included)."""
        tokenizer = getattr(self.tokenizer, "encode", None)
        if tokenizer is None:
            return None
        ids = tokenizer(caption)
        if len(ids) + 2 <= self.context_length:
            return None
        decode = getattr(self.tokenizer, "decode", None)
        kept = ids[: self.context_length - 2]
        return decode(kept).strip() if decode else f"the first {len(kept)} tokens"

    def encode_captions(self, captions: list[str]) -> TextEncoding:
        return self.encode_text(self.tokenize(captions))

    def preprocess(self, pixels: torch.Tensor, fit: str = "crop") -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> the model's input size and normalization. A non-square image
        is cropped to its centre square first, as CLIP's own preprocessing does (shorter side to the
        input size, centre crop), or with fit="pad" padded to a square with the mean color."""
        x = (pixels.float() + 1) / 2
        if x.shape[-1] != x.shape[-2]:
            if fit == "pad":
                x = square_pad(x, 0.0) + square_pad(torch.zeros_like(x[:, :1]), 1.0) * self.pixel_mean.float()
            else:
                x = square_crop(x)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        # the tower's own dtype: bf16 weights (precision=bf16) take bf16 pixels; autocast casts itself
        return x.to(next(self.model.visual.parameters()).dtype)

    def encode_image(self, pixels: torch.Tensor, fit: str = "crop") -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, E) image embeddings (not normalized); `fit`: see preprocess."""
        return self.model.encode_image(self.preprocess(pixels, fit))

    @torch.no_grad()
    def similarity(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(B,) cosine between each image (pixels in [-1, 1]) and its caption: 100 x max(this, 0) is
        the CLIP score (Hessel et al. 2021, without their 2.5 weight)."""
        image = F.normalize(self.encode_image(pixels).float(), dim=-1)
        text = F.normalize(self.encode_captions(captions).embedding.float(), dim=-1)
        return (image * text).sum(-1)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contrastive training: normalized image and text embeddings and the logit scale.

        The scale is clamped at 100 here rather than by editing the parameter after each step, so
        the clamp holds under ZeRO, where the optimizer's master copy is the real parameter."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.model.encode_text(tokens), dim=-1)
        scale = self.model.logit_scale.clamp(max=math.log(100.0)).exp()
        return image, text, scale

    # --- identity ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the architecture and the weights: embeddings made by one CLIP must not be
        mixed with another's. Hashes a strided sample of every tensor, so it costs little at 1B."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for name, t in sorted(self.model.state_dict().items()):
            flat = t.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What identifies this CLIP's architecture (the weights aside)."""
        return {
            "arch": self.config.arch,
            "model_cfg": self.config.model_cfg,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "quick_gelu": self.config.quick_gelu,
        }

    def export_config(self) -> dict[str, Any]:
        """The config an export of this CLIP carries; loadable with ClipConfig(checkpoint=folder)."""
        return {"kind": "clip", "clip": asdict(self.config) | {"checkpoint": None, "pretrained": None}}

    def export(self, folder: str | os.PathLike) -> None:
        """Weights as safetensors + the config, loadable with ClipConfig(checkpoint=folder)."""
        write_export(folder, self.model.state_dict(), self.export_config())


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


# What a record (an export's config.json, a decoder's CLIP record) and `extra` may pass to open_clip:
# an allowlist. Nothing here fetches, unpickles or imports anything: open_clip's weights_only,
# load_weights, pretrained_*_path and cache_dir keywords, and the tower fields that pull timm or
# Hugging Face models from a hub, are refused.
EXTRA_ALLOWED: dict[str, Any] = {
    "force_patch_dropout": float | None,
    "force_image_size": int | list[int] | None,
    "output_dict": bool | None,
}
MODEL_CFG_ALLOWED: dict[str, Any] = {
    "embed_dim": int,
    "vision_cfg": dict,
    "text_cfg": dict,
    "quick_gelu": bool,
    "init_logit_scale": float,
    "init_logit_bias": float | None,
    "nonscalar_logit_scale": bool,
}
TOWER_REFUSED_PREFIXES = ("timm_", "hf_", "tokenizer_")
TOWER_REFUSED = ("act_kwargs", "norm_kwargs")


def clip_config_from_record(record: Any, where: str) -> ClipConfig:
    """A ClipConfig from a record someone else wrote, every key and type checked (unclip.records).
    A record never turns downloads on: allow_download is the caller's choice, not the file's."""
    cfg = from_record(ClipConfig, record, where)
    cfg.allow_download = False
    check_clip_config(cfg, where)
    return cfg


def check_clip_config(cfg: ClipConfig, where: str = "model.clip") -> None:
    """Refuse what would reach open_clip beyond the allowlists above, naming the key."""
    for key, value in (cfg.extra or {}).items():
        if key not in EXTRA_ALLOWED:
            raise RecordError(
                f"{where}.extra.{key} is not allowed: only {', '.join(EXTRA_ALLOWED)} pass to open_clip "
                "(weights load weights-only, from model.clip.checkpoint, and nothing is downloaded)"
            )
        check_value(value, EXTRA_ALLOWED[key], f"{where}.extra.{key}")
    if cfg.model_cfg is None:
        return
    model_cfg = _plain(cfg.model_cfg)
    for key, value in model_cfg.items() if isinstance(model_cfg, dict) else [("", model_cfg)]:
        if key not in MODEL_CFG_ALLOWED:
            raise RecordError(f"{where}.model_cfg.{key} is not a known key (known: {', '.join(MODEL_CFG_ALLOWED)})")
        check_value(value, MODEL_CFG_ALLOWED[key], f"{where}.model_cfg.{key}")
    for key, tower in (("vision_cfg", open_clip.model.CLIPVisionCfg), ("text_cfg", open_clip.model.CLIPTextCfg)):
        fields_ = [f.name for f in dataclasses.fields(tower)]
        refused = tuple(f for f in fields_ if f.startswith(TOWER_REFUSED_PREFIXES) or f in TOWER_REFUSED)
        check_record(tower, model_cfg.get(key, {}), f"{where}.model_cfg.{key}", exclude=refused)


def _config_from_export(folder: Path, cfg: ClipConfig) -> ClipConfig:
    """An export folder carries its architecture: use it, keep the caller's frozen flag."""
    meta = read_export_config(folder, kind="clip")
    saved = clip_config_from_record(meta["clip"], f"{folder / EXPORT_CONFIG}: clip")
    saved.checkpoint = str(folder / EXPORT_WEIGHTS)
    saved.frozen = cfg.frozen
    return saved


def build_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> ClipEncoder:
    """Create the CLIP that `cfg` names, with its weights (read weights-only), on `device`."""
    if cfg.checkpoint and Path(cfg.checkpoint).is_dir():
        cfg = _config_from_export(Path(cfg.checkpoint), cfg)
    check_clip_config(cfg)
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {cfg.checkpoint!r} does not exist. Point model.clip.checkpoint at a local "
            "weights file (.pt/.bin/.safetensors) or a train.clip export folder (runs/<name>/export)."
        )
    kwargs: dict[str, Any] = dict(cfg.extra)
    if cfg.quick_gelu:
        kwargs["force_quick_gelu"] = True
    if cfg.context_length:
        kwargs["force_context_length"] = cfg.context_length
    if cfg.arch == "custom":
        model = _build_custom(cfg, kwargs)
    else:
        model = _build_named(cfg, kwargs | {"device": device})
    if cfg.checkpoint:
        with _clear_checkpoint_errors(cfg):
            # weights_only: a .pt file's pickle may hold tensors and plain containers, nothing that runs
            open_clip.load_checkpoint(model, cfg.checkpoint, weights_only=True)
    tokenizer = _tokenizer(cfg, model)
    encoder = ClipEncoder(model, tokenizer, cfg)
    return encoder.to(device)


def _build_custom(cfg: ClipConfig, kwargs: dict[str, Any]) -> nn.Module:
    if not cfg.model_cfg:
        raise ValueError("model.clip.arch=custom needs model.clip.model_cfg (embed_dim, vision_cfg, text_cfg)")
    model_cfg = _plain(cfg.model_cfg)
    if kwargs.pop("force_quick_gelu", False):
        model_cfg["quick_gelu"] = True
    if "force_context_length" in kwargs:
        model_cfg["text_cfg"]["context_length"] = kwargs.pop("force_context_length")
    unused = sorted(set(kwargs) - {"output_dict"})
    if unused:
        raise ValueError(f"model.clip.extra {unused} apply to named open_clip models, not arch=custom")
    return open_clip.model.CLIP(**model_cfg, **kwargs)


@contextlib.contextmanager
def _clear_checkpoint_errors(cfg: ClipConfig):
    """open_clip's errors for a checkpoint that does not fit (a truncated file, a tensor of another
    shape, a key the architecture lacks, a pickle that is more than weights) as one ValueError naming
    the file and the architecture."""
    try:
        yield
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"CLIP checkpoint {cfg.checkpoint}: refused to load: {refused_pickle(e)}. Weights are read "
            "weights-only (tensors and plain containers): re-save the weights as a plain state dict or safetensors."
        ) from None
    except (RuntimeError, SafetensorError, KeyError, EOFError, OSError, ValueError) as e:
        lines = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in lines[:4]) + (" ..." if len(lines) > 4 else "")
        raise ValueError(
            f"CLIP checkpoint {cfg.checkpoint} does not load into model.clip.arch={cfg.arch}: "
            f"{type(e).__name__}: {detail}. Check that the file is complete and that arch (and model_cfg) "
            "match the model it was saved from."
        ) from e


def _build_named(cfg: ClipConfig, kwargs: dict[str, Any]) -> nn.Module:
    if cfg.arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {cfg.arch!r}; known: {', '.join(open_clip.list_models()[:8])}, ...")
    tower = (open_clip.get_model_config(cfg.arch) or {}).get("text_cfg", {})
    if tower.get("hf_model_name"):
        raise ValueError(
            f"CLIP {cfg.arch} has a Hugging Face text tower ({tower['hf_model_name']}), which unclip cannot read "
            "token outputs from and which would be fetched from the hub: use a standard CLIP"
        )
    if cfg.checkpoint or not cfg.pretrained:  # the architecture alone; a checkpoint loads after
        return open_clip.create_model(cfg.arch, **kwargs)
    if not cfg.allow_download:
        raise ValueError(
            f"CLIP {cfg.arch}/{cfg.pretrained} would be downloaded, and downloads are off. Download the "
            "weights once where the network allows, then set model.clip.checkpoint=/path/to/weights, "
            "or set model.clip.allow_download=true."
        )
    try:
        return open_clip.create_model(cfg.arch, pretrained=cfg.pretrained, **kwargs)
    except Exception as e:  # open_clip raises a bare RuntimeError when the hub is unreachable
        raise RuntimeError(
            f"could not fetch CLIP weights {cfg.arch}/{cfg.pretrained} ({e}). On an offline machine, set "
            "model.clip.checkpoint to a local copy."
        ) from e


def _tokenizer(cfg: ClipConfig, model: nn.Module):
    context = model.context_length
    if cfg.arch == "custom":
        return open_clip.tokenizer.SimpleTokenizer(context_length=context)
    return open_clip.get_tokenizer(cfg.arch, context_length=context)


def _plain(obj):
    """Deep-copy nested dict/list configs (OmegaConf containers included) into plain Python."""
    if hasattr(obj, "items"):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj
