"""What every training entrypoint does after composing its config: build, train, report, exit."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from data.loader import DataError
from train.checkpoint import CheckpointError
from train.config import JobConfig, to_object
from train.control import REQUEUE_EXIT_CODE
from train.distributed import destroy_distributed, is_main
from train.slurm import requeue_sweep_job
from train.sweeps import sweep_run_name
from train.task import Task
from train.trainer import Trainer, TrainingError


def run(job: JobConfig, task: Task) -> int:
    """Train `task` under `job`; returns the process exit code (0, REQUEUE_EXIT_CODE, or 1 on bad input)."""
    trainer = None
    try:
        trainer = Trainer(job, task)
        return trainer.train()
    except (DataError, CheckpointError, TrainingError, FileNotFoundError, ValueError) as e:
        if is_main() or not isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()


BRACE_PATTERN = re.compile(r"\{[^}]*\.\.[^}]*\}")  # a shard range: {00000..00999}


def check_overrides(argv: list[str] | None = None) -> None:
    """Before Hydra parses the command line (sys.argv unless given): a shard range written as the shell leaves it
    (data.shards=/d/{00000..00999}.tar) is a Hydra grammar error ("mismatched input '{'"), since Hydra
    reads a brace as the start of a dict. Say how to quote it instead."""
    for arg in (sys.argv if argv is None else argv)[1:]:
        key, sep, value = arg.partition("=")
        if sep and BRACE_PATTERN.search(value) and value[:1] not in "'\"":
            sys.exit(
                f"config error: in {arg!r} Hydra reads the braces as a dict. Quote the value for Hydra, "
                f"inside the shell's quotes: '{key}=\"{value}\"'"
            )


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
