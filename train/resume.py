"""What a checkpoint holds of a run, and resuming one with its checks: the Trainer's third part, beside
the loop (train/trainer.py) and its outputs (train/outputs.py). The files themselves are
train/checkpoint.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.checkpoint import CheckpointError, capture_rng, compare_jobs, restore_rng
from train.distributed import is_main
from train.precision import dtype_name, saved_weights_dtype


class RunState:
    """save() and resuming; mixed into the Trainer, whose state (engine, EMA, loader, metrics, step) they
    write and restore."""

    def save(self) -> Path:
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_total": self.nonfinite_total,
            "wandb_id": self.metrics.wandb_id,
            "model": self._model_identity(),
            "zero_stage": self.cfg.distributed.zero_stage,
            "precision": self.precision,
            "weights_dtype": dtype_name(self.dtype),  # what the optimizer state belongs to
            "job": self._config_dict(),
        }
        rank_state = {"loader": self.train_loader.state_dict(), "rng": capture_rng()}
        path = self.ckpt.save(self.step, self.engine, self.ema, state, rank_state)
        if is_main():
            print(f"checkpoint {path}", flush=True)
        return path

    def _check_same_job(self, path: Path) -> None:
        """A resume continues the same run: another model or data source is refused, naming the keys;
        other changes (optimizer, seed, ...) are allowed and appended to config_changes.jsonl."""
        state = self.ckpt.read_state(path)
        if "job" not in state:  # a checkpoint from before jobs were recorded: the model check alone
            return
        refused, recorded = compare_jobs(state["job"], self._config_dict())
        if refused:
            keys = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            own = path.parent.resolve() == (self.run_dir / "checkpoints").resolve()
            where = f"{self.run_dir} holds" if own else f"checkpoint {path} was written by"
            way_out = (
                "Give this run its own name (name=...), or start over in this folder with trainer.resume=never "
                "after deleting it."
                if own
                else "Resume a checkpoint of this run's own model and data, or start from its weights with "
                f"model.init_from={path.parent.parent / 'export'} (a new optimizer, step 0)."
            )
            raise CheckpointError(
                f"{where} a run of another model or data ({keys}{more}), and resuming it would train that run "
                f"on this config. {way_out}"
            )
        if recorded and is_main():
            change = {
                "step": state["step"],
                "changes": {k: {"from": old, "to": new} for k, (old, new) in recorded.items()},
            }
            with open(self.run_dir / "config_changes.jsonl", "a") as f:
                f.write(json.dumps(change) + "\n")
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in recorded.items())
            print(f"resuming with changed settings: {shown} (recorded in config_changes.jsonl)", flush=True)

    def _resume(self, path: Path, universal: bool) -> str | None:
        saved = self.ckpt.read_state(path)
        if saved.get("model") != self._model_identity():
            raise CheckpointError(
                f"{path} was written for another model config than this run's. Resume needs the same model; "
                "choose a new run name (name=...) or trainer.resume=never to start over in this one."
            )
        saved_dtype, dtype = saved_weights_dtype(saved), dtype_name(self.dtype)
        if saved_dtype not in (None, dtype):
            raise CheckpointError(
                f"{path} holds {saved_dtype} weights and their optimizer state, and this run trains {dtype} "
                f"weights (precision {self.precision}{' by autocast' if self.autocast else ''}): resume with the "
                "precision it was saved under (float32 weights: precision=bf16_autocast or fp32; bfloat16: "
                "precision=bf16), or start from its weights with model.init_from=<its export> (a new optimizer, "
                "step 0). On a GPU precision=auto meant bf16 autocast before 2026-12-04, bf16 weights since."
            )
        if universal:
            self.ckpt.prepare_universal(path)
        state, rank_state = self.ckpt.load(path, self.engine, self.ema, universal)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        if rank_state is not None:
            restore_rng(rank_state["rng"])
            self.train_loader.load_state_dict(rank_state["loader"])
        else:  # another world size: fresh per-rank streams, not a replay of the old ones
            torch.manual_seed(self.cfg.seed + 1_000 * self.rank + 7_919 * self.step)
            self.train_loader.reseed(self.step)
        if is_main():
            how = f" (world size {state['world_size']} -> {self.world})" if state["world_size"] != self.world else ""
            print(f"resumed from {path} at step {self.step}{how}", flush=True)
        return state.get("wandb_id")
