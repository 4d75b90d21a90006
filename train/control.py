"""Stopping and asking, agreed by every rank at the same step.

Preemption: SIGTERM (SLURM's default at time limit, and what torchrun forwards to its workers),
SIGUSR1 (what `sbatch --signal=USR1@120` sends) and SIGUSR2 (what submitit, the launcher of Hydra
sweeps on SLURM, asks for) set a flag in the process that gets them. Each step
the ranks all-reduce their flags, so all of them stop at the same step, save, and exit with
REQUEUE_EXIT_CODE after writing runs/<name>/REQUEUE for the SLURM script (torchrun replaces its
workers' exit codes with its own, so the file is what survives it).

torchrun does not forward SIGUSR1 to its workers, and dies of it by default. So the workers also
watch their parent: if the launcher that started them is gone, they stop and save as if signalled.
`launch/run.sh` shields torchrun from USR1 and turns the signal into a node-local file
(UNCLIP_PREEMPT_FILE) that the workers check every step, so one still starting up sees it too.

Requests: `touch runs/<name>/CHECKPOINT` or `touch runs/<name>/EXPORT` asks a running job for a
checkpoint or an export at the next step; rank 0 sees the file, every rank agrees, the file is removed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from train.distributed import all_reduce, get_local_rank, is_main

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
REQUEUE_MARKER = "REQUEUE"
CHECKPOINT_REQUEST = "CHECKPOINT"
EXPORT_REQUEST = "EXPORT"
# USR2 replaces submitit's own handler while training: that one requeues and exits on the spot, mid-step
# and unsaved; ours saves first, and train.run then requeues the job the way submitit would.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class Decision:
    stop: bool = False
    checkpoint: bool = False
    export: bool = False


class Control:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.signal_name: str | None = None
        self.parent = os.getppid()
        self.watch_parent = "TORCHELASTIC_RUN_ID" in os.environ  # started by torchrun
        preempt_file = os.environ.get("UNCLIP_PREEMPT_FILE")  # set by launch/run.sh
        self.preempt_file = Path(preempt_file) if preempt_file else None
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Every signal only asks for the stop, a repeated one too: under `srun torchrun` a worker gets
        # SIGTERM from SLURM and again from torchrun, and must still save. A run stuck where no step
        # ends is ended by the SIGKILL that SLURM, torchrun and `timeout -k` send after their grace.
        self.signal_name = signal.Signals(signum).name

    def _local_flags(self) -> list[int]:
        stop = self.signal_name is not None
        if not stop and self.watch_parent and os.getppid() != self.parent:
            self.signal_name = "launcher exited"
            stop = True
        if not stop and self.preempt_file is not None and self.preempt_file.exists():
            self.signal_name = "SIGUSR1 (to the launcher)"
            stop = True
        ckpt = export = False
        if is_main():
            ckpt = (self.run_dir / CHECKPOINT_REQUEST).exists()
            export = (self.run_dir / EXPORT_REQUEST).exists()
        return [int(stop), int(ckpt), int(export)]

    def poll(self) -> Decision:
        """What every rank does after this step (collective)."""
        flags = torch.tensor(self._local_flags(), dtype=torch.int32)
        all_reduce(flags, op="max")
        stop, ckpt, export = (bool(x) for x in flags.tolist())
        if is_main():
            for flag, name in ((ckpt, CHECKPOINT_REQUEST), (export, EXPORT_REQUEST)):
                if flag:
                    (self.run_dir / name).unlink(missing_ok=True)
        return Decision(stop=stop, checkpoint=ckpt, export=export)

    def mark_requeue(self) -> None:
        """runs/<name>/REQUEUE for the job script; and, when launch/run.sh asks for it, a node-local
        marker that lets it exit with the requeue code although torchrun exits with its own."""
        reason = f"preempted by {self.signal_name or 'a peer rank'}\n"
        if is_main():
            (self.run_dir / REQUEUE_MARKER).write_text(reason)
        node_marker = os.environ.get("UNCLIP_REQUEUE_MARKER")
        if node_marker and get_local_rank() == 0:
            Path(node_marker).write_text(reason)

    def clear_requeue(self) -> None:
        if is_main():
            (self.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
