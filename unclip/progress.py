"""Progress of a pipeline call, counted in reverse steps (model calls) across its stages.

One public call (text_to_image, outpaint, ...) is one bar: a tqdm bar on a terminal (or as asked),
and an optional listener (done, total, stage) that the server uses to show a request's progress. A
call made of several inner generations (outpainting's tiles) opens the count with its whole total
first; the inner ones then add nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from tqdm import tqdm

Listener = Callable[[int, int, str], None]  # (steps done, steps in all, the stage running)


class StepProgress:
    def __init__(self, show: bool | None = None):
        self.show = show  # None: a bar on a terminal only
        self.listener: Listener | None = None
        self._bar: tqdm | None = None
        self._stage = ""

    @contextlib.contextmanager
    def call(self, total: int):
        """Count one call's `total` steps (nested calls join the outer count)."""
        if self._bar is not None:
            yield
            return
        disable = None if self.show is None else not self.show
        self._bar = tqdm(total=total, unit="step", disable=disable, dynamic_ncols=True)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def stage(self, name: str) -> None:
        self._stage = name
        if self._bar is not None:
            self._bar.set_description(name)

    def tick(self, _step: int, x: torch.Tensor) -> torch.Tensor:
        """The samplers' on_step hook: one reverse step done."""
        if self._bar is not None:
            self._bar.update(1)
            if self.listener is not None:
                self.listener(self._bar.n, self._bar.total, self._stage)
        return x
