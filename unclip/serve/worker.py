"""One model worker owns the device; requests wait in a bounded queue (text-generation-inference's
router, for images).

- The queue holds at most `capacity` waiting jobs: a full queue is answered at once (503 with
  Retry-After), never hung. A job whose client went away is dropped from the count at once (its
  place is freed) and skipped when its turn comes; a running batch whose clients all went away stops
  at the next reverse step.
- Generations with the same settings, size and n are batched: the worker takes the oldest job and
  every queued job it is compatible with, up to `max_images` images. Each image is drawn from its
  own seed's generators (unclip.pipeline), so a request's seed gives the same images alone or in a
  batch. Edits and variations run one request at a time.
- Progress (steps done of the job's total, the stage running, the place in the queue) is kept per
  job for the editor to poll.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any

from unclip.settings import SampleSettings


class Cancelled(Exception):
    """Every client of the running batch went away."""


class QueueFull(Exception):
    pass


@dataclass
class Job:
    kind: str  # generation | edit | variation
    args: dict[str, Any]  # what the pipeline call takes (prompt, image, mask, n, ...)
    settings: SampleSettings
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    result: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued | running | done
    progress: dict[str, Any] = field(default_factory=dict)
    submitted: float = field(default_factory=time.monotonic)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys run as one batch; None: runs alone."""
        if self.kind != "generation":
            return None
        knobs = tuple((f.name, getattr(self.settings, f.name)) for f in fields(SampleSettings) if f.name != "seed")
        return (self.args["n"], knobs)


class Worker:
    def __init__(self, pipe, capacity: int = 16, max_images: int = 16):
        self.pipe = pipe
        self.capacity, self.max_images = capacity, max_images
        self.waiting: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}  # by id, for progress; finished jobs are kept a while
        self.lock = threading.Condition()
        self.running: list[Job] = []
        self.batches = itertools.count()  # batches started, for the tests and the logs
        self.last_step_s = 1.0  # how long a batch took, for Retry-After
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="unclip model worker", daemon=True)
        self.pipe.steps.listener = self._on_step

    def start(self) -> Worker:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        self.thread.join(timeout=5)

    # --- the HTTP side ---------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self.lock:
            waiting = sum(1 for j in self.waiting if not j.cancelled.is_set())
            if waiting >= self.capacity:
                raise QueueFull(self.retry_after_s())
            self.waiting.append(job)
            self.jobs[job.id] = job
            self._forget_old()
            self.lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: free its place (the worker skips it, or stops its batch)."""
        job.cancelled.set()
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                job.state = "done"
                job.result.cancel()

    def retry_after_s(self) -> int:
        return max(1, round(self.last_step_s))

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            place = [j for j in self.waiting if not j.cancelled.is_set()]
            position = place.index(job) + 1 if job in place else 0
            return {"id": job.id, "state": job.state, "queue_position": position} | job.progress

    # --- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.waiting:
                    self.lock.wait()
                if self._stop:
                    return
                batch = self._next_batch()
                self.running = batch
                for job in batch:
                    job.state = "running"
            started = time.monotonic()
            next(self.batches)  # counted before its requests are answered
            self._run(batch)
            self.last_step_s = time.monotonic() - started
            with self.lock:
                self.running = []

    def _next_batch(self) -> list[Job]:
        first = self.waiting.popleft()
        key = first.batch_key()
        batch, images = [first], first.args.get("n", 1)
        if key is not None:
            for job in list(self.waiting):
                if job.batch_key() == key and images + job.args["n"] <= self.max_images:
                    self.waiting.remove(job)
                    batch.append(job)
                    images += job.args["n"]
        return batch

    def _run(self, batch: list[Job]) -> None:
        from unclip.serve.calls import run_batch  # the pipeline calls (torch), kept apart from the queue

        try:
            outputs = run_batch(self.pipe, batch)
        except Cancelled:
            outputs = [Cancelled()] * len(batch)
        except Exception as e:  # noqa: BLE001 - a failed call fails its requests, never the worker
            outputs = [e] * len(batch)
        for job, out in zip(batch, outputs):
            job.state = "done"
            if isinstance(out, BaseException):
                job.result.set_exception(out)
            else:
                job.result.set_result(out)

    def _on_step(self, done: int, total: int, stage: str) -> None:
        """The pipeline's progress hook: record it, and stop a batch nobody waits for any more."""
        for job in self.running:
            job.progress = {"steps_done": done, "steps_total": total, "stage": stage}
        if self.running and all(job.cancelled.is_set() for job in self.running):
            raise Cancelled()

    def _forget_old(self, keep_s: float = 600.0) -> None:
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            if job.state == "done" and now - job.submitted > keep_s:
                del self.jobs[job_id]
