"""A trained stack, loaded from its exports and checked to belong together.

Every stage that reads CLIP embeddings (the prior, the decoder) must have been trained with the same
CLIP (compared by fingerprint), and the resolutions must chain: the decoder's 64 px feed up256's
64 -> 256, whose output feeds up1024's 256 -> 1024. A mismatch is an error naming both exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from unclip.clip import ClipConfig, ClipEncoder, build_clip, clip_config_from_record
from unclip.decoder import Decoder, decoder_from_config
from unclip.export import CONFIG, WEIGHTS, read_export
from unclip.prior import DiffusionPrior, prior_from_config
from unclip.provenance import file_sha256
from unclip.upsampler import Upsampler, upsampler_from_config

UPSAMPLERS = ("up256", "up1024")


@dataclass
class ExportInfo:
    """Where a stage came from: written into every image's provenance."""

    path: str
    run: str | None
    step: int | None
    sha256: str

    @classmethod
    def of(cls, folder: str | Path, config: dict[str, Any]) -> ExportInfo:
        return cls(str(folder), config.get("run"), config.get("step"), file_sha256(Path(folder) / WEIGHTS))


@dataclass
class Stack:
    clip: ClipEncoder
    decoder: Decoder
    prior: DiffusionPrior | None = None
    upsamplers: dict[str, Upsampler] = field(default_factory=dict)  # "up256", "up1024"
    exports: dict[str, ExportInfo] = field(default_factory=dict)


def load_stack(
    *,
    decoder: str | Path,
    prior: str | Path | None = None,
    up256: str | Path | None = None,
    up1024: str | Path | None = None,
    clip: str | Path | ClipConfig | None = None,
    device: str | torch.device = "cpu",
) -> Stack:
    """The stack's models in eval mode on `device`, after every check (see the module docstring)."""
    paths = {"decoder": decoder, "prior": prior, "up256": up256, "up1024": up1024}
    loaded = {name: _read(name, path) for name, path in paths.items() if path is not None}
    clip_model = _load_clip(clip, loaded["decoder"], device)
    check_clip(clip_model, {name: v for name, v in loaded.items() if name in ("prior", "decoder")}, clip)
    models = {name: _build(name, *export, device) for name, export in loaded.items()}
    if "prior" in models and models["prior"].embed_dim != models["decoder"].clip_dim:
        raise ValueError(
            f"prior={prior} samples {models['prior'].embed_dim}-d embeddings but decoder={decoder} reads "
            f"{models['decoder'].clip_dim}-d ones"
        )
    upsamplers = {name: models[name] for name in UPSAMPLERS if name in models}
    check_chain(models["decoder"], upsamplers)
    exports = {name: ExportInfo.of(folder, config) for name, (folder, _, config) in loaded.items()}
    return Stack(clip_model, models["decoder"], models.get("prior"), upsamplers, exports)


def _read(name: str, folder: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    kind = "upsampler" if name in UPSAMPLERS else name
    try:
        weights, config = read_export(folder, kind=kind)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{name}={folder}: {e}") from e
    return Path(folder), weights, config


def _build(name: str, folder: Path, weights, config, device) -> torch.nn.Module:
    build = {"prior": prior_from_config, "decoder": decoder_from_config}.get(name, upsampler_from_config)
    model = build(config, str(folder / CONFIG))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{name}: the weights do not fit the exported config: {e}") from e
    return model.to(device).eval()


def _load_clip(clip, decoder_export, device) -> ClipEncoder:
    """The CLIP given, or the one the decoder's export names."""
    folder, _, config = decoder_export
    if isinstance(clip, ClipConfig):
        return build_clip(replace(clip, frozen=True), device)
    if clip is not None:
        return build_clip(ClipConfig(checkpoint=str(clip)), device)
    record = config.get("clip")
    if not record:
        raise ValueError(f"decoder={folder} names no CLIP: pass clip=<the CLIP it was trained with>")
    cfg = clip_config_from_record(record, f"{folder / CONFIG}: clip")
    if cfg.checkpoint and not Path(cfg.checkpoint).exists():
        raise FileNotFoundError(
            f"decoder={folder} was trained with the CLIP at {cfg.checkpoint}, which is not there (moved?): "
            "pass clip=<path to that CLIP's export or weights>"
        )
    return build_clip(replace(cfg, frozen=True), device)


def check_clip(clip: ClipEncoder, loaded: dict[str, tuple], given) -> None:
    """Every stage that reads CLIP embeddings must have been trained with this CLIP (fingerprints)."""
    mine = clip.fingerprint()
    for name, (folder, _, config) in loaded.items():
        theirs = config.get("clip_fingerprint")
        if theirs is None or theirs == mine:
            continue
        others = [f"{n}={f} (CLIP {c.get('clip_fingerprint')})" for n, (f, _, c) in loaded.items() if n != name]
        source = f"clip={given}" if given is not None else "the decoder's own record"
        raise ValueError(
            f"{name}={folder} was trained with CLIP {theirs}, but the CLIP in use ({source}) is CLIP {mine}"
            + (f"; the other stages: {', '.join(others)}" if others else "")
            + ". Every stage of a stack must share one CLIP: retrain the odd one out, or point clip= at its CLIP."
        )


def check_chain(decoder: Decoder, upsamplers: dict[str, Upsampler]) -> None:
    """64 -> 256 -> 1024: each upsampler takes what the stage before it makes."""
    size, previous = decoder.image_size, "decoder"
    if "up1024" in upsamplers and "up256" not in upsamplers:
        raise ValueError("up1024 upsamples the 256px images of up256: load up256 too")
    for name in UPSAMPLERS:
        if name not in upsamplers:
            continue
        cfg = upsamplers[name].cfg
        takes = cfg.target_size // cfg.scale
        if takes != size:
            raise ValueError(
                f"{name} upsamples {takes}px images to {cfg.target_size}px, but {previous} makes {size}px ones"
            )
        size, previous = cfg.target_size, name
