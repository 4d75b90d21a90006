"""Stopping an eval for a preemption: it exits with the requeue code between batches of generation,
and the requeued job resumes from the images already on disk.

The signals are the trainer's (SIGTERM at a time limit, SIGUSR1 from sbatch --signal, SIGUSR2 from
submitit); under launch/run.sh the warning arrives as the node-local file UNCLIP_PREEMPT_FILE, and
the marker UNCLIP_REQUEUE_MARKER tells run.sh to pass the requeue code on past torchrun.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

REQUEUE_EXIT_CODE = 75  # what slurm/job.sh requeues on (train.control uses the same)
_signalled: list[str] = []


class Preempted(Exception):
    """Raised between batches once a preemption warning came; the caller exits REQUEUE_EXIT_CODE."""


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda num, frame: _signalled.append(signal.Signals(num).name))


def check() -> None:
    """Raise Preempted if a signal came or launch/run.sh left its preemption file."""
    flag = os.environ.get("UNCLIP_PREEMPT_FILE")
    if _signalled or (flag and Path(flag).exists()):
        marker = os.environ.get("UNCLIP_REQUEUE_MARKER")
        if marker:
            Path(marker).touch()
        raise Preempted(_signalled[0] if _signalled else "preemption file")
