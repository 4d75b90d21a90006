"""Metrics: reported from anywhere, reduced across ranks in one place, written by rank 0 only."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoggerConfig:
    wandb: str = "offline"  # online | offline | disabled; metrics.jsonl is always written
    project: str = "unclip"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
