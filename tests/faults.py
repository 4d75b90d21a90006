"""Run a module with a fault planted in one rank: `python -m tests.faults train.clip overrides...`.

The multi-process tests need a rank that fails where a real one would (a full disk while writing its
part of a checkpoint, a damaged file it reads) while the other ranks run normally. The fault is set by
environment variables, so it works under torchrun, which starts every rank the same way:

    UNCLIP_FAULT_RANK=1                          the rank that fails (RANK)
    UNCLIP_FAULT_ENOSPC=step_00000004.tmp        torch.save / safetensors writes into a path holding
                                                 this text raise OSError(ENOSPC) on that rank
    UNCLIP_FAULT_LINGER=30                       that rank stays alive this long after it has failed,
                                                 its connections open: as under NCCL, where a peer's
                                                 exit does not end a collective that waits for it
"""

from __future__ import annotations

import atexit
import errno
import os
import runpy
import sys
import time


def _install() -> None:
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
    _install()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
