"""Run a module with faults or checks planted in its ranks: `python -m tests.faults train.clip ...`.

The multi-process tests start every rank through this (tests/trainer_helpers.module_command), so
what is set here holds for all of them. Set by environment variables, which torchrun passes to every
rank alike:

    UNCLIP_STRICT_COLLECTIVES=1                  collectives refuse tensors as NCCL would (below)
    UNCLIP_FAULT_RANK=1                          the rank the faults below apply to (RANK)
    UNCLIP_FAULT_ENOSPC=step_00000004.tmp        torch.save / safetensors writes into a path holding
                                                 this text raise OSError(ENOSPC) on that rank
    UNCLIP_FAULT_LINGER=30                       that rank stays alive this long after it has failed,
                                                 its connections open: as under NCCL, where a peer's
                                                 exit does not end a collective that waits for it

Strict collectives. NCCL takes tensors on the rank's GPU only; gloo, which the CPU tests run on,
takes anything, so a statistic reduced on the CPU passes every CPU test and crashes the first GPU
job. Our rule is that our code hands tensors to torch.distributed only through train.distributed,
whose helpers stage them on the backend's device (comm_device) and back. Here every tensor
collective checks that: a tensor not on comm_device() is refused as NCCL refuses a CPU tensor, and
so is a call from any of our modules other than train/distributed.py (on a CPU every tensor is on
the CPU, so bypassing the helper is the one way this bug shows). DeepSpeed, open_clip and torch's
differentiable collectives pass the model's own tensors and activations, which live on the training
device, and are let through.
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "train" / "distributed.py"
TENSOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "gather",
    "scatter",
)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def _caller() -> Path | None:
    """The first frame outside torch itself: who asked for this collective. None for torch's
    differentiable collectives (torch.distributed.nn, open_clip's feature gather and its backward):
    they move the model's activations, which live on the training device."""
    frame = sys._getframe(2)
    torch_dir = Path(__import__("torch").__file__).parent
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if torch_dir / "distributed" / "nn" in path.parents:
            return None
        if torch_dir not in path.parents and path != Path(__file__).resolve():
            return path
        frame = frame.f_back
    return None


def _ours(path: Path | None) -> bool:
    return path is not None and ROOT in path.parents and "site-packages" not in path.parts


def _strict_collectives() -> None:
    import torch
    import torch.distributed as dist

    from train.distributed import comm_device

    def check(name, real):
        @functools.wraps(real)
        def call(*args, **kwargs):
            caller = _caller()
            if _ours(caller) and caller != HELPER:
                raise RuntimeError(
                    f"strict collectives: {caller.relative_to(ROOT)} calls torch.distributed.{name} itself; our "
                    "code reduces through train.distributed, which puts tensors on the backend's device"
                )
            if name in TENSOR_COLLECTIVES:
                for t in [*args, *kwargs.values()]:
                    tensors = t if isinstance(t, list | tuple) else [t]
                    for x in tensors:
                        if isinstance(x, torch.Tensor) and x.device != comm_device():
                            raise RuntimeError(
                                f"strict collectives: torch.distributed.{name} got a tensor on {x.device}, the "
                                f"backend takes {comm_device()} (as NCCL takes CUDA tensors only)"
                            )
            return real(*args, **kwargs)

        return call

    for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, check(name, getattr(dist, name)))


def _faults() -> None:
    if os.environ.get("RANK", "0") != os.environ.get("UNCLIP_FAULT_RANK", "-1"):
        return
    marker = os.environ.get("UNCLIP_FAULT_ENOSPC")
    if marker:
        import safetensors.torch
        import torch

        def full(real):
            def write(obj, f, *args, **kwargs):
                if marker in str(f):
                    raise OSError(errno.ENOSPC, "No space left on device", str(f))
                return real(obj, f, *args, **kwargs)

            return write

        torch.save = full(torch.save)
        safetensors.torch.save_file = full(safetensors.torch.save_file)
    linger = float(os.environ.get("UNCLIP_FAULT_LINGER", 0))
    if linger:
        atexit.register(time.sleep, linger)


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    if os.environ.get("UNCLIP_STRICT_COLLECTIVES"):
        _strict_collectives()
    _faults()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
