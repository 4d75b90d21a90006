"""Running train.clip in-process or under torchrun for the trainer tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from train.config import compose, to_object

ROOT = Path(__file__).resolve().parent.parent


def clip_overrides(data_dir: Path, runs: Path, name: str, steps: int, **extra) -> list[str]:
    """A few fast steps of the tiny CLIP on the session's synthetic shards."""
    base = {
        "name": name,
        "runs_dir": str(runs),
        "data.shards": str(data_dir / "train"),
        "data.heldout_shards": str(data_dir / "heldout"),
        "data.resolution": 32,
        "data.num_workers": 0,
        "trainer.num_steps": steps,
        "trainer.batch_per_gpu": 8,
        "trainer.log_every": 1,
        "trainer.val_every": 0,
        "trainer.sample_every": 0,
        "trainer.ckpt_every": 0,
        "trainer.val_batches": 1,
        "trainer.progress": "lines",
        "optim.warmup_steps": 2,
        "logger": "none",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def clip_job(*args, **kw):
    return to_object(compose("clip", clip_overrides(*args, **kw)))


def env(**extra: str) -> dict[str, str]:
    return (
        os.environ
        | {
            "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "UNCLIP_STRICT_COLLECTIVES": "1",  # as NCCL would (tests/faults.py)
            "HF_HUB_OFFLINE": "1",
        }
        | extra
    )


def module_command(module: str, args: list[str], nproc: int = 1) -> list[str]:
    """`python -m module args`, under torchrun when nproc > 1, every rank started through tests.faults
    (strict collectives, and whatever fault the environment plants; see its docstring)."""
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    # --standalone: a private rendezvous on a free port, so test runs never collide
    torchrun = [sys.executable, "-m", "train.torchrun", "--standalone", "--nproc_per_node", str(nproc)]
    return [*torchrun, "-m", "tests.faults", module, *args]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 240, **extra_env: str):
    return subprocess.run(
        module_command(module, args, nproc),
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def command(overrides: list[str], nproc: int = 1) -> list[str]:
    return module_command("train.clip", overrides, nproc)


def run_clip(overrides: list[str], nproc: int = 1, timeout: int = 240, **extra_env: str):
    return run_module("train.clip", overrides, nproc, timeout, **extra_env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until predicate() holds while proc runs; fail with its output if it ends first or time runs out."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"process ended early ({proc.returncode}):\n{(out or '')[-2000:]}\n{(err or '')[-4000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)
