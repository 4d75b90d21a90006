"""Run under 2 ranks by test_distributed: a reduction through train.distributed passes the strict
collectives of tests/faults.py; the same tensor handed to torch.distributed directly is refused."""

import sys

import torch
import torch.distributed as dist

from train.distributed import all_reduce, barrier, destroy_distributed, init_process_group

if __name__ == "__main__":
    init_process_group("gloo")
    t = torch.ones(3, dtype=torch.float64)
    all_reduce(t)
    assert t.tolist() == [2.0, 2.0, 2.0]
    try:
        dist.all_reduce(torch.ones(3))
        refused = None
    except RuntimeError as e:
        refused = e
    # Both ranks leave together and close the group: a gloo rank exiting with its group open while the
    # other still talks to it can abort in gloo's teardown ("terminate called without an active
    # exception", signal 6), which CI once saw.
    barrier()
    destroy_distributed()
    print(f"refused: {refused}" if refused else "not refused", flush=True)
    sys.exit(0 if refused else 1)
