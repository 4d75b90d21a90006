"""What a run says about itself: how each start was launched, and a model card with every export.

runs/<name>/launches.jsonl holds one line per start of the job (a resume or a requeue is another
start): the command line and its overrides, the git commit and whether the tree was dirty, the
package versions, the machine (host, GPUs) and the world size. export/README.md says what the
export is, what it was trained on and for how long, its last validation metrics, and how to load it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from unclip.provenance import package_versions

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "unclip",
    "torch",
    "deepspeed",
    "open_clip_torch",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "numpy",
    "wandb",
)


def git_state(root: Path = ROOT) -> dict[str, Any] | None:
    """The commit the code is at and whether the work tree differs from it; None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def machine() -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def overrides() -> list[str]:
    """The command line's Hydra overrides (what differs from the config files)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not under @hydra.main (tests, notebooks)
        return sys.argv[1:]


def launch_record(world_size: int, resumed_from: str | None) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "overrides": overrides(),
        "resumed_from": resumed_from,
        "world_size": world_size,
        "git": git_state(),
        "versions": package_versions(PACKAGES),
        "machine": machine(),
    }


def append_launch(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "launches.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


LOADERS = {
    "clip": "from unclip.clip import ClipConfig, build_clip\nclip = build_clip(ClipConfig(checkpoint={path!r}))",
    "prior": "from unclip.prior import load_prior\nprior = load_prior({path!r})",
    "decoder": "from unclip.decoder import load_decoder\ndecoder = load_decoder({path!r})",
    "upsampler": "from unclip.upsampler import load_upsampler\nupsampler = load_upsampler({path!r})",
}


def model_card(
    folder: Path, config: dict[str, Any], job: dict[str, Any], params: int, metrics: dict[str, float]
) -> str:
    """export/README.md: what the export is and how to load it."""
    kind = config["kind"]
    data = job["data"]
    source = data.get("embeddings") if not data.get("load_images", True) else data.get("shards")
    lines = [
        f"# {job['name']}: an unclip {kind}",
        "",
        f"{params / 1e6:,.1f}M trained parameters; EMA weights (decay {config['ema_decay']}) after step "
        f"{config['step']:,} ({config['samples_seen']:,} samples seen).",
        "",
        f"- data: `{source}` ({data.get('name')}, {data.get('resolution')} px)",
        f"- held out: `{data.get('heldout_shards') or data.get('heldout_embeddings')}`",
        f"- optimizer: AdamW lr {job['optim']['lr_peak']}, {job['optim']['schedule']} schedule; precision "
        f"{job['precision']['dtype']}; ZeRO-{job['distributed']['zero_stage']}",
    ]
    if config.get("clip_fingerprint"):
        lines.append(f"- CLIP: fingerprint {config['clip_fingerprint']} (the CLIP it must be used with)")
    if metrics:
        lines += ["", "Last validation:", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    lines += [
        "",
        "Load it:",
        "",
        "```python",
        LOADERS[kind].format(path=str(folder)),
        "```",
        "",
        "Weights in `model.safetensors` (no pickle), what to build in `config.json`; the run's config,",
        "metrics and launches are in the run folder beside this one.",
        "",
    ]
    return "\n".join(lines)
