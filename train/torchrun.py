"""`python -m train.torchrun ...` is torchrun, with its endings said in one line.

torchrun itself ends a preempted job (SIGTERM to the process group) with a 20-40 line traceback of
its own SignalException, and a job with a failed worker with a ChildFailedError table, both after
the workers have said what happened. This runs torchrun's own `main` unchanged and turns those two
endings into one line each and an exit code: 128 + the signal for a signal, the first failed
worker's code for a failure. launch/run.sh launches through it; any torchrun command line works:

    python -m train.torchrun --nproc_per_node 8 -m train.decoder experiment=paper_decoder
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name}; the workers were told to save and stop", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        code = first.exitcode
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        others = len(e.failures) - 1
        more = f" ({others} more worker{'s' if others > 1 else ''} stopped with it)" if others else ""
        print(f"torchrun: worker rank {rank} failed first, with {how}{more}; its error is above", file=sys.stderr)
        return 128 - code if code < 0 else code
    return 0


if __name__ == "__main__":
    sys.exit(main())
