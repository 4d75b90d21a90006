"""What an entrypoint tells the one trainer: what is trained, what a batch is, what the loss is.

The prior, decoder, upsampler and CLIP entrypoints each define one Task; the Trainer does the rest
(DeepSpeed, precision, EMA, checkpoints, metrics, signals). A Task never touches distributed code:
`validate` and `sample` run on every rank with the rank's own batches, and what they return is
reduced (metrics) or saved by rank 0 (images).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data.loader import DataConfig


@dataclass
class Grid:
    """A sample grid: images (N, 3, H, W) in [-1, 1], a caption each, laid out `columns` wide."""

    images: torch.Tensor
    captions: list[str]
    columns: int = 8


@dataclass
class TaskContext:
    device: torch.device
    dtype: torch.dtype  # the trained model's compute dtype (bf16 / fp16 / fp32)
    rank: int
    world_size: int
    seed: int


class Task:
    kind: str = "task"  # written into the export config: clip | prior | decoder | upsampler

    def setup(self, ctx: TaskContext) -> None:
        """Build what is not trained (a frozen CLIP, a noise schedule) on ctx.device."""
        self.ctx = ctx

    def data_config(self, data: DataConfig) -> DataConfig:
        """What the loaders read: `data` unless the task reads images at another resolution than the
        one it trains at (a frozen CLIP in the loop embeds images at its own input size)."""
        return data

    def build_model(self) -> nn.Module:
        """The trained model, as a plain nn.Module on the CPU or ctx.device (DeepSpeed wraps it)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimize, named values to report). Inputs are cast to ctx.dtype here."""
        raise NotImplementedError

    def validate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Optional: held-out metrics with the EMA weights; values are averaged over ranks."""
        return {}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Optional: the in-training eval (trainer.eval_every) with the EMA weights, e.g. FD-CLIP and
        the CLIP score of samples for held-out captions (train.online_eval); values come back reduced over
        ranks (a collective: every rank calls it)."""
        return {}

    def sample(self, model: nn.Module, batch: dict[str, Any]) -> Grid | None:
        """Optional: the sample grid, made with the EMA weights on every rank (rank 0 saves it).
        Draw randomness from a torch.Generator, never the global RNG: a resumed run must not diverge."""
        return None

    def before_export(self, model: nn.Module) -> None:
        """Optional: measure on data, with the EMA weights, what the export records besides them
        (the prior's x0 error for Analytic-DPM sampling). Every rank calls it, in eval mode."""

    def export_config(self, model: nn.Module) -> dict[str, Any]:
        """What loading the export needs besides the weights: {"kind": ..., model config ...}."""
        return {"kind": self.kind}

    def export_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EMA state dict as the export stores it (a task may rename or drop entries)."""
        return state

    def import_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An export's tensors under the trained model's names (the inverse of export_weights), for
        model.init_from."""
        return weights

    def summary(self, metrics: dict[str, float]) -> str | None:
        """Optional: a line for the end of the run (the demo prints it)."""
        return None
