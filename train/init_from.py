"""model.init_from: a new run that starts from an export's weights (fine-tuning, domain adaptation).

    python -m train.decoder experiment=demo_decoder model.init_from=runs/demo-decoder/export name=my-domain ...

Unlike trainer.resume, which continues a run (its step, optimizer, schedule, data position), this
starts at step 0 with a fresh optimizer and learning-rate schedule; only the weights (and the
buffers the export holds, such as the prior's normalization statistics) come from the export. The
load is strict by default: every tensor must exist on both sides with the same shape. With
model.init_strict=false what matches loads and the rest is listed and keeps its fresh initialization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unclip.export import read_export


@dataclass
class InitReport:
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the model, not in the export: kept fresh
    unexpected: list[str] = field(default_factory=list)  # in the export, not in the model: ignored
    mismatched: list[str] = field(default_factory=list)  # in both, with other shapes: kept fresh

    def describe(self, limit: int = 8) -> str:
        def names(keys: list[str]) -> str:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = [f"{self.loaded} tensors loaded"]
        for label, keys in (
            ("not in the export (kept fresh)", self.missing),
            ("not in the model (ignored)", self.unexpected),
            ("of another shape (kept fresh)", self.mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {names(keys)}")
        return "; ".join(parts)


def init_from_export(
    model: nn.Module,
    folder: str,
    kind: str,
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    strict: bool = True,
) -> InitReport:
    """Copy an export's tensors into `model` (before DeepSpeed wraps it). `rename` maps the export's
    names to the model's where a task stores them otherwise (CLIP's open_clip names)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model.init_from={folder}: no such export folder (a runs/<name>/export)")
    weights, config = read_export(folder)
    if config.get("kind") != kind:
        raise ValueError(
            f"model.init_from={folder} is a {config.get('kind')!r} export; this entrypoint trains a {kind!r}"
        )
    if rename is not None:
        weights = rename(weights)
    own = model.state_dict()
    report = InitReport(
        missing=sorted(set(own) - set(weights)),
        unexpected=sorted(set(weights) - set(own)),
    )
    usable = {}
    for name in sorted(set(own) & set(weights)):
        theirs, mine = weights[name], own[name]
        if theirs.shape == mine.shape or theirs.numel() == mine.numel() == 1:
            usable[name] = theirs.reshape(mine.shape)
        else:
            report.mismatched.append(f"{name} {tuple(theirs.shape)} vs {tuple(mine.shape)}")
    report.loaded = len(usable)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(
            f"model.init_from={folder} does not fit this model ({report.describe()}). Make the model config "
            "match the export's, or set model.init_strict=false to load what fits and train the rest from scratch."
        )
    with torch.no_grad():
        for name, value in usable.items():
            own[name].copy_(value.to(own[name].dtype))
    return report


def export_hint(path: Path) -> str:
    """What to say when trainer.resume names an export rather than a checkpoint."""
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return (
            f" {path} is an export: to start a new run from its weights (step 0, a fresh optimizer and "
            f"schedule), use model.init_from={path}."
        )
    return ""
