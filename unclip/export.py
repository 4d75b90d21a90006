"""The export format: what training hands to sampling and evaluation.

    export/model.safetensors   the EMA weights (no pickle needed to load them)
    export/config.json         {"kind": "clip" | "prior" | "decoder" | "upsampler", "model": {...}, ...}

Written atomically: a new export replaces the old one only once it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def write_export(
    folder: str | os.PathLike, weights: dict[str, torch.Tensor], config: dict[str, Any], readme: str | None = None
) -> Path:
    """Weights, config and an optional model card (README.md), swapped in whole: a reader sees the old
    export or the new one, never a mix."""
    folder = Path(folder)
    if "kind" not in config:
        raise ValueError("an export config names its model kind (clip, prior, decoder, upsampler)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    if readme is not None:
        (tmp / "README.md").write_text(readme)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_export_config(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an export folder (no {CONFIG}); the trainer writes one into "
            "runs/<name>/export at the end of a run"
        )
    config = json.loads(path.read_text())
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"{folder} holds a {config.get('kind')!r} export, not a {kind!r} one")
    return config


def read_export(folder: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, config) of an export folder."""
    config = read_export_config(folder, kind)
    weights_path = Path(folder) / WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has a config but no {WEIGHTS}")
    return load_weights(weights_path), config


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or damaged file is a ValueError that says so."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        size = Path(path).stat().st_size if Path(path).exists() else 0
        raise ValueError(
            f"{path} ({size} bytes) is not a readable safetensors file, truncated or damaged ({e}). "
            "Copy it again, or re-export the run (touch runs/<name>/EXPORT, or rerun its command)."
        ) from e
