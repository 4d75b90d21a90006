"""AdamW with weight decay that skips norms and biases, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr_peak: float = 1e-4  # learning rate after warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices and convolutions only, never to norms or biases
    schedule: str = "cosine"  # cosine | constant | linear (decay after warmup)
    warmup_steps: int = 100  # linear warmup from 0 to lr_peak
    lr_final_ratio: float = 0.1  # cosine / linear end at lr_peak * lr_final_ratio
    fused: bool | None = None  # fused AdamW kernel; None = on where the device supports it

    def validate(self) -> None:
        if self.schedule not in ("cosine", "constant", "linear"):
            raise ValueError(f"optim.schedule must be cosine, constant or linear, got {self.schedule!r}")
        if self.lr_peak <= 0 or self.warmup_steps < 0 or not 0 <= self.lr_final_ratio <= 1:
            raise ValueError("optim: lr_peak > 0, warmup_steps >= 0 and 0 <= lr_final_ratio <= 1 are required")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed (weights of rank >= 2) and not decayed (biases, norm gains, embeddings a
    model lists in `no_weight_decay()`, e.g. learned null embeddings and positional tables)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in skip or name.endswith(".bias") or ".norm" in name or "norm." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    cfg.validate()
    # torch has fused AdamW kernels for CUDA and, since 2.4, the CPU (4x the foreach step on 10M
    # parameters here: 7 vs 29 ms, which is 8% of a tiny decoder's step)
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr_peak, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
    )


def lr_multiplier(step: int, cfg: OptimConfig, num_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based) as a fraction of lr_peak."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, num_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr_final_ratio + (1.0 - cfg.lr_final_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, num_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, num_steps))
