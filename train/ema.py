"""Exponential moving average of the trained weights, sharded like ZeRO-3 under every ZeRO stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmaConfig:
    decay: float = 0.9999  # unCLIP App. C: 0.9999 for every model
    start_step: int = 0  # before this step the EMA copies the weights
    every: int = 1  # update every N optimizer steps (decay is compounded to match)
