"""The export format: what training hands to sampling and evaluation.

    export/model.safetensors   the EMA weights (no pickle needed to load them)
    export/config.json         {"kind": "clip" | "prior" | "decoder" | "upsampler", "model": {...}, ...}

Written atomically: a new export replaces the old one only once it is complete.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unclip.records import RecordError, check_value, read_json_object

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def write_export(
    folder: str | os.PathLike, weights: dict[str, torch.Tensor], config: dict[str, Any], readme: str | None = None
) -> Path:
    """Weights, config and an optional model card (README.md), swapped in whole: a reader sees the old
    export or the new one, never a mix. A write that fails (a full disk) leaves no export.tmp behind,
    keeps the previous export, and is an ExportError that says what happened."""
    folder = Path(folder)
    if "kind" not in config:
        raise ValueError("an export config names its model kind (clip, prior, decoder, upsampler)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
        if readme is not None:
            (tmp / "README.md").write_text(readme)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous export is kept" if (folder / WEIGHTS).is_file() else "there was no export before"
        if is_disk_full(e):
            raise ExportError(
                f"the disk is full: writing the export {folder} failed with {_free(folder.parent)} free; the "
                f"partial export was removed and {kept}. Free space and export again (touch "
                f"{folder.parent / 'EXPORT'} in a running job, or rerun its command). ({e})"
            ) from e
        raise ExportError(f"writing the export {folder} failed: {e}. The partial export was removed and {kept}.") from e
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


class ExportError(RuntimeError):
    """An export could not be written; the message says why and what was kept."""


def is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC as an OSError, or as torch's and safetensors' writers report it (`unexpected pos`,
    `file write failed`, `No space left on device` in the text)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "unexpected pos" in text or "file write failed" in text


def _free(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "an unknown amount"
    return f"{free / 2**30:.2f} GiB" if free >= 2**27 else f"{free / 2**20:.1f} MiB"


# The keys an export's config.json may hold at its top level, with their types; what each kind needs.
# The model records under them are checked by the model's own from_config (unclip.records).
TOP_LEVEL: dict[str, Any] = {
    "kind": str,
    "clip": dict,  # a CLIP export's own config, or the CLIP a prior / decoder was trained with
    "clip_fingerprint": str | None,
    "prior": dict,
    "embed_dim": int,
    "text_width": int,
    "context_length": int,
    "x0_error": dict[str, Any] | None,
    "decoder": dict,
    "clip_dim": int,
    "clip_text_width": int,
    "upsampler": dict,
    "step": int | None,
    "samples_seen": int | None,
    "ema_decay": float | None,
    "run": str | None,
}
REQUIRED = {
    "clip": ("clip",),
    "prior": ("prior", "embed_dim", "text_width", "context_length"),
    "decoder": ("decoder", "clip_dim", "clip_text_width"),
    "upsampler": ("upsampler",),
}


def read_export_config(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """An export's config.json, checked at its top level: an object, a known kind (the one asked
    for), the records that kind needs, no unknown key, every value of its type."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an export folder (no {CONFIG}); the trainer writes one into "
            "runs/<name>/export at the end of a run"
        )
    config = read_json_object(path, "export config")
    found = config.get("kind")
    if found not in REQUIRED:
        raise RecordError(f"{path}: kind must be one of {', '.join(REQUIRED)}, got {found!r}")
    if kind is not None and found != kind:
        raise ValueError(f"{folder} holds a {found!r} export, not a {kind!r} one")
    for key, value in config.items():
        if key not in TOP_LEVEL:
            raise RecordError(f"{path}: {key} is not a known key of an export config (known: {', '.join(TOP_LEVEL)})")
        config[key] = check_value(value, TOP_LEVEL[key], f"{path}: {key}")
    missing = [key for key in REQUIRED[found] if key not in config]
    if missing:
        raise RecordError(f"{path}: a {found} export config needs {', '.join(missing)}, which it lacks")
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


def refused_pickle(error: BaseException) -> str:
    """What a weights-only torch.load refused, in one phrase (torch's own message is a page long and
    advises weights_only=False, which would run the file's code)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return f"it holds {found.group(1)}, which is more than weights and could run code when unpickled"
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        return "it holds more than tensors and plain containers, which could run code when unpickled"
    return first


def load_torch_weights(path: str | os.PathLike, what: str = "weights") -> Any:
    """torch.load(weights_only=True) of a file someone gave us: a pickle that asks for more than
    tensors is refused without running, a damaged or foreign file is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load the {what}: {refused_pickle(e)}") from None
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise ValueError(
            f"{path} ({size} bytes) is not a readable torch {what} file: truncated, damaged or another format "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})"
        ) from None
