"""What every training entrypoint does after composing its config: build, train, report, exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from data.loader import DataError
from train.checkpoint import CheckpointError
from train.cli import sweep_run_name
from train.config import JobConfig, to_object
from train.control import REQUEUE_EXIT_CODE
from train.distributed import destroy_distributed, is_main
from train.slurm import requeue_sweep_job
from train.task import Task
from train.trainer import Trainer, TrainingError
from unclip.export import ExportError


def run(job: JobConfig, task: Task) -> int:
    """Train `task` under `job`; returns the process exit code (0, REQUEUE_EXIT_CODE, or 1 on bad input)."""
    trainer = None
    try:
        trainer = Trainer(job, task)
        return trainer.train()
    except (DataError, CheckpointError, ExportError, TrainingError, FileNotFoundError, ValueError) as e:
        if is_main() or not isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()


def main(cfg: DictConfig, make_task: Callable[[JobConfig], Task]) -> None:
    """The body of every @hydra.main: validate the config, train, exit with the trainer's code."""
    try:
        job = to_object(cfg)
    except OmegaConfBaseException as e:  # a missing required value, a bad type left after composition
        sys.exit(f"config error: {e}")
    job.name = sweep_run_name(job.name)
    code = run(job, make_task(job))
    if code == REQUEUE_EXIT_CODE:
        requeue_sweep_job(os.environ)
    if code:
        sys.exit(code)
