"""What a training run produces besides its weights' updates: validation losses, in-training evals,
sample grids and exports, all with the EMA weights swapped in. One of the Trainer's three parts: the loop in
train/trainer.py decides when, this file says how.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch

from train.agreement import agree
from train.checkpoint import capture_rng, restore_rng
from train.distributed import is_main
from train.record import model_card
from train.task import Task
from unclip.export import ExportError, write_export
from unclip.grid import save_grid


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state_dict would hold, without calling state_dict (ZeRO-3 partitions parameters)."""
    out = {}
    for prefix, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().float().cpu()
    return out


class RunOutputs:
    """Validation, in-training eval, sample grids and export; mixed into the Trainer, whose state
    (engine, EMA, task, held-out loader, metrics, step) they read."""

    def _heldout_batches(self, n: int) -> list[dict[str, Any]]:
        """The first n held-out batches: the same ones at every validation and sample grid."""
        if self.heldout_loader is None:
            return []
        self.heldout_loader.rewind()
        return list(islice(iter(self.heldout_loader), n))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        batches = self._heldout_batches(self.cfg.trainer.val_batches)
        if not batches:
            return {}
        self._say(f"step {self.step}: validating on {len(batches)} held-out batch(es)")
        module = self.engine.module
        module.eval()
        with self.ema.swapped_in(), self._autocast():
            values = self.task.validate(module, batches)
        module.train()
        self.last_val = self.metrics.write_means(self.step, {f"val/{k}": v for k, v in values.items()})
        return self.last_val

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's in-training eval on the first eval_batches held-out batches, as eval/* metrics."""
        batches = self._heldout_batches(self.cfg.trainer.eval_batches)
        if not batches:
            return {}
        self._say(f"step {self.step}: in-training eval on {len(batches)} held-out batch(es)")
        module = self.engine.module
        module.eval()
        with self.ema.swapped_in(), self._autocast():
            values = self.task.evaluate(module, batches)
        module.train()
        return self.metrics.write_means(self.step, {f"eval/{k}": v for k, v in values.items()}) if values else {}

    @torch.no_grad()
    def sample(self) -> Path | None:
        batches = self._heldout_batches(1)
        if not batches:
            return None
        self._say(f"step {self.step}: sampling a grid")
        module = self.engine.module
        module.eval()
        with self.ema.swapped_in(), self._autocast():
            out = self.task.sample(module, batches[0])
        module.train()
        if out is None or not is_main():
            return None
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        save_grid(out.images, out.captions, out.columns, path)
        self.metrics.log_image("samples", path, self.step)
        return path

    def _autocast(self):
        """Validation and sample grids run in the precision training runs in (outside the engine)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast and dtype is not None)

    def _say(self, message: str) -> None:
        """One line before something slow that has no progress bar of its own (rank 0)."""
        if is_main() and self.cfg.trainer.progress != "off":
            print(message, flush=True)

    def export(self) -> Path:
        self._say(f"step {self.step}: exporting the EMA weights")
        if type(self.task).before_export is not Task.before_export:  # swap the EMA in only to measure
            module = self.engine.module
            module.eval()
            rng = capture_rng()  # measuring must not move any random stream (bit-exact resume)
            with torch.no_grad(), self.ema.swapped_in(), self._autocast():
                self.task.before_export(module)
            restore_rng(rng)
            module.train()
        # EMA parameters, plus the buffers (normalization statistics, ...) as the live model has them
        state = self.ema.full_state_dict() | persistent_buffers(self.engine.module)
        weights = self.task.export_weights(state)
        folder = self.run_dir / "export"
        failure = None
        if is_main():
            config = self.task.export_config(self.engine.module) | {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "ema_decay": self.cfg.trainer.ema.decay,
                "run": self.cfg.name,
            }
            card = model_card(folder, config, self._config_dict(), self._param_count(), self.last_val)
            try:
                write_export(folder, weights, config, readme=card)
                print(f"export {folder}", flush=True)
            except ExportError as e:
                failure = str(e)
        # the other ranks learn rank 0's outcome from the store: a failed export never leaves them waiting
        agreed = agree(self.ckpt.next_tag("export"), failure)
        if agreed is not None:
            raise ExportError(failure or f"the export failed on {agreed}")
        return folder
