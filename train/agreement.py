"""Outcomes agreed through the rendezvous store, not a collective.

A step that every rank takes alone (writing its checkpoint shard, reading one back, rank 0 writing
the export) can fail on one rank while another waits inside a collective of DeepSpeed's that the
failed rank will never join: an all-reduce of the outcome would then wait for the collective timeout
(30 minutes), and under NCCL a peer's exit does not end that wait either. The store the process group
was rendezvoused through is a plain key-value server: a rank posts its outcome there without waiting
for anyone, and the others read it within a fraction of a second.

    failure = None
    with abort_if_a_peer_fails(tag, on_failure=say_why):   # a rank blocked in a collective is stopped
        try: ...this rank's part...
        except OSError as e: failure = str(e)
    agreed = agree(tag, failure)                           # None, or the first rank's failure

torchrun's agent hosts that store. If it has died (torchrun dies of SIGUSR1; the workers then save
and stop on their own), the workers still reach each other, so agreements fall back to a collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from train import distributed
from train.distributed import all_gather_object, get_rank, get_world_size

POLL_S = 0.1  # how often a waiting rank (or a watching thread) looks at the store


def _store():
    """The rendezvous store, or None when it went with a dead launcher."""
    if distributed.launcher_pid is not None and os.getppid() != distributed.launcher_pid:
        return None
    return dist.distributed_c10d._get_default_store()


def agree(tag: str, failure: str | None, timeout_s: float | None = None) -> str | None:
    """Every rank's outcome of step `tag`: None when every rank succeeded, else the first failure
    posted ("rank R: why"). A rank that failed returns at once; the others return as soon as any
    rank posts a failure, or once all have posted success."""
    if get_world_size() == 1:
        return None if failure is None else f"rank 0: {failure}"
    store = _store()
    if store is None:
        return _agree_by_collective(failure)
    try:
        return _agree_by_store(store, tag, failure, timeout_s or distributed.collective_timeout_s)
    except dist.DistNetworkError:  # the store's server went away mid-step
        return _agree_by_collective(failure)


def _agree_by_store(store, tag: str, failure: str | None, timeout_s: float) -> str | None:
    if failure is not None:
        earlier = peer_failure(tag)  # a peer that failed first is the cause (this may be its lost connection)
        if earlier is not None:
            return earlier
        message = f"rank {get_rank()}: {failure}"
        store.set(f"{tag}/message", message)
        store.add(f"{tag}/failed", 1)
        return message
    store.add(f"{tag}/done", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        if store.add(f"{tag}/failed", 0):
            return store.get(f"{tag}/message").decode()
        if store.add(f"{tag}/done", 0) >= get_world_size():
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"ranks did not agree on {tag} within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _agree_by_collective(failure: str | None) -> str | None:
    outcomes = all_gather_object(failure)
    return next((f"rank {r}: {f}" for r, f in enumerate(outcomes) if f is not None), None)


def peer_failure(tag: str) -> str | None:
    """The failure a rank posted for step `tag` so far, or None (no waiting; None too without a store)."""
    store = _store() if get_world_size() > 1 else None
    if store is None:
        return None
    try:
        return store.get(f"{tag}/message").decode() if store.add(f"{tag}/failed", 0) else None
    except dist.DistNetworkError:
        return None


@contextlib.contextmanager
def abort_if_a_peer_fails(tag: str, on_failure: Callable[[str], None], grace_s: float = 2.0):
    """While the block runs, a thread watches the store for another rank's failure of step `tag`.
    When one comes, the block has `grace_s` to end by itself (the normal path then handles it); if it
    has not, this rank is taken to be blocked inside a collective the failed rank will never join,
    which nothing else ends: `on_failure(message)` runs in the thread and the process exits with 1."""
    if get_world_size() == 1:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            message = peer_failure(tag)
            if message is None or done.wait(grace_s):
                continue
            try:
                on_failure(message)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)

    watcher = threading.Thread(target=watch, name=f"watch {tag}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
