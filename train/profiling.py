"""trainer.profile: torch.profiler over a window of training steps, as torchtitan's profiling does.

    python -m train.decoder experiment=demo_decoder trainer.profile.start=20 trainer.profile.steps=5
    python -m benchmarks.train_step decoder model/decoder=base64 --profile 5     # the same, in a benchmark

Steps start+1 .. start+steps are recorded, counted as the run counts them (a run resumed past `start`
records nothing). Start past the first steps: they select kernels and, with trainer.compile, compile.
Each rank writes to <run dir>/profile/: the operators' table, sorted by their own time on the device
(ops_rank<r>.txt: the GPU's time on a GPU, the CPU's on a CPU), and with trace=true a Chrome / Perfetto
trace (trace_rank<r>.json, for ui.perfetto.dev). Validation, grids and checkpoints that fall inside the
window are recorded too: keep them out of it for a training step's profile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASE = "unclip:"  # the prefix of the trainer's own labelled ranges


def phase(name: str) -> record_function:
    """A labelled range of the step (next_batch, loss, backward, ...): its own row in the phases table.
    Outside a profile window it costs a check of whether a profiler is on."""
    return record_function(PHASE + name)


@dataclass
class ProfileConfig:
    start: int = 0  # record from the step after this one (0 = off)
    steps: int = 5  # steps recorded
    record_shapes: bool = False  # the table grouped by operator and input shapes
    trace: bool = True  # also write the Chrome / Perfetto trace
    rows: int = 40  # operators in the table


def check_profile(cfg: ProfileConfig) -> None:
    if cfg.start < 0 or cfg.steps < 1 or cfg.rows < 1:
        raise ValueError(
            f"trainer.profile: start={cfg.start} steps={cfg.steps} rows={cfg.rows}: start >= 0 (0 = off), "
            "steps >= 1 and rows >= 1"
        )


class StepProfiler:
    """Call after_step(step) after every optimizer step and close() when training ends."""

    def __init__(self, cfg: ProfileConfig, folder: Path, rank: int, device: torch.device):
        check_profile(cfg)
        self.cfg, self.folder, self.rank = cfg, Path(folder), rank
        self.on_gpu = device.type == "cuda"
        self._profile: profile | None = None
        self._first = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.start > 0

    def after_step(self, step: int) -> None:
        if not self.enabled:
            return
        if self._profile is None and step == self.cfg.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
            self._profile = profile(activities=activities, record_shapes=self.cfg.record_shapes)
            self._profile.__enter__()
            self._first = step + 1
        elif self._profile is not None and step >= self.cfg.start + self.cfg.steps:
            self._finish(step)

    def close(self, step: int) -> None:
        """A run that ends (or stops) inside the window still writes what it recorded."""
        if self._profile is not None:
            self._finish(step)

    def _finish(self, last: int) -> None:
        prof, self._profile = self._profile, None
        if self.on_gpu:
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
        averages = prof.key_averages(group_by_input_shape=self.cfg.record_shapes)
        table = averages.table(sort_by=sort, row_limit=self.cfg.rows, max_name_column_width=60)
        header = f"steps {self._first}..{last} of rank {self.rank}, sorted by {sort}\n"
        ops = self.folder / f"ops_rank{self.rank}.txt"
        phases = phases_table(averages, last - self._first + 1, self.on_gpu)  # ranges carry no shapes: one row each
        ops.write_text(header + phases + "\n" + table)
        written = [ops]
        if self.cfg.trace:
            trace = self.folder / f"trace_rank{self.rank}.json"
            prof.export_chrome_trace(str(trace))
            written.append(trace)
        if self.rank == 0:
            print(
                f"profile of steps {self._first}..{last}: {', '.join(map(str, written))}", file=sys.stderr, flush=True
            )


def phases_table(averages, steps: int, on_gpu: bool) -> str:
    """The labelled ranges of the step (phase()), in ms per step: their CPU time with what they call,
    and on a GPU the kernels they launched."""
    lines = ["| phase | calls per step | CPU ms per step | GPU ms per step |", "|---|---:|---:|---:|"]
    rows = [e for e in averages if e.key.startswith(PHASE)]
    for e in sorted(rows, key=lambda e: -e.cpu_time_total):
        gpu = f"{e.device_time_total / 1e3 / steps:.1f}" if on_gpu else "-"
        cpu = f"{e.cpu_time_total / 1e3 / steps:.1f}"
        lines.append(f"| {e.key.removeprefix(PHASE)} | {e.count / steps:g} | {cpu} | {gpu} |")
    return "\n".join(lines) + "\n"
