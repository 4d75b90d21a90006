"""Run under 2 ranks by test_distributed: a reduction through train.distributed passes the strict
collectives of tests/faults.py; the same tensor handed to torch.distributed directly is refused."""

import sys

import torch
import torch.distributed as dist

from train.distributed import all_reduce, init_process_group

if __name__ == "__main__":
    init_process_group("gloo")
    t = torch.ones(3, dtype=torch.float64)
    all_reduce(t)
    assert t.tolist() == [2.0, 2.0, 2.0]
    try:
        dist.all_reduce(torch.ones(3))
    except RuntimeError as e:
        print(f"refused: {e}", flush=True)
        sys.exit(0)
    print("not refused", flush=True)
    sys.exit(1)
