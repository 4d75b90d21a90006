"""Metrics: reported from anywhere, reduced across ranks in one place, written by rank 0 only.

    from train.metrics import report
    report("loss/mse", loss)                 # a tensor or a float, from any module, on any rank

At each log step the trainer calls `MetricsWriter.flush(step)`: every rank's sums and counts are
reduced in one all-reduce, and rank 0 appends one line to runs/<name>/metrics.jsonl and, when
enabled, logs the same numbers to the job's single wandb run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.distributed import all_gather_object, all_reduce, get_world_size, is_main


@dataclass
class LoggerConfig:
    wandb: str = "offline"  # online | offline | disabled; metrics.jsonl is written in every mode
    project: str = "unclip"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class _Stats:
    """Per-rank running sums since the last flush. Tensors stay on their device until the flush,
    so reporting a loss never forces a GPU sync."""

    def __init__(self):
        self.sums: dict[str, Any] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def report(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean()
        self.sums[name] = self.sums[name] + value
        self.counts[name] += 1

    def reduce(self) -> dict[str, float]:
        """Means over everything every rank reported since the last call (collective)."""
        names = sorted(set().union(*all_gather_object(sorted(self.sums))))
        table = torch.zeros(len(names), 2, dtype=torch.float64)  # all_reduce stages it for the backend
        for i, name in enumerate(names):
            if name in self.sums:
                table[i, 0] = torch.as_tensor(self.sums[name], dtype=torch.float64)
                table[i, 1] = self.counts[name]
        all_reduce(table)
        self.sums.clear()
        self.counts.clear()
        out = {}
        for i, name in enumerate(names):
            total, count = table[i].tolist()
            if count:
                out[name] = total / count
        return out


_STATS = _Stats()


def report(name: str, value) -> None:
    """Record a value under `name`; it is averaged over reports and ranks at the next flush."""
    _STATS.report(name, value)


class MetricsWriter:
    """metrics.jsonl (always) and wandb (when enabled), on rank 0; a no-op writer on other ranks."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        name: str,
        config: dict,
        wandb_id: str | None,
        resumed_step: int | None = None,
    ):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        if not is_main():
            return
        if resumed_step is not None:
            self._forget_after(resumed_step)
        if cfg.wandb not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb must be online, offline or disabled, got {cfg.wandb!r}")
        mode = os.environ.get("WANDB_MODE", cfg.wandb) if cfg.wandb != "disabled" else "disabled"
        if mode != "disabled":
            import wandb

            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
            # One run per job: the id is stored with the run, so every requeue continues it.
            try:
                self.wandb = wandb.init(
                    project=cfg.project,
                    entity=cfg.entity,
                    group=cfg.group,
                    tags=cfg.tags,
                    name=name,
                    id=self.wandb_id,
                    resume="allow",
                    dir=str(run_dir),
                    mode=mode,
                    config=config,
                )
            except Exception as e:  # wandb raises UsageError, CommError, timeouts: all mean "not logged"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(
                    f"wandb ({mode}) could not start a run: {first}. Log in first (`wandb login`, or set "
                    "WANDB_API_KEY), or log offline with logger=offline (upload later with `wandb sync "
                    f"{run_dir}/wandb/offline-run-*`), or not at all with logger=none."
                ) from e

    def _forget_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines, so every step
        is in metrics.jsonl once (a line cut short by a kill goes too)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce what was reported since the last flush and write it (collective)."""
        values = _STATS.reduce() | (extra or {})
        if is_main():
            self._write(step, values)
        return values

    def write_means(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Average `values` over ranks (every rank passes the same keys) and write them (collective);
        what report() gathered meanwhile stays for the next flush."""
        names = sorted(values)
        table = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        all_reduce(table)
        means = {n: v / get_world_size() for n, v in zip(names, table.tolist())}
        if is_main():
            self._write(step, means)
        return means

    def _write(self, step: int, values: dict[str, float]) -> None:
        line = {"step": step, "time": round(time.time(), 3)} | {k: _round(v) for k, v in sorted(values.items())}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _round(v: float) -> float:
    return float(f"{v:.6g}") if isinstance(v, float) else v


class Progress:
    """A bar on a terminal, plain lines in a log file (SLURM), nothing on ranks other than 0."""

    def __init__(self, mode: str, total: int, start: int):
        self.enabled = is_main() and mode != "off"
        self.bar = None
        self.total = total
        if self.enabled and (mode == "bar" or (mode == "auto" and sys.stdout.isatty())):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict[str, float], eta_s: float) -> None:
        if not self.enabled:
            return
        shown = {k: values[k] for k in ("loss", "lr", "images_per_s") if k in values}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)
        else:
            parts = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"step {step}/{self.total} {parts} eta {_hms(eta_s)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
