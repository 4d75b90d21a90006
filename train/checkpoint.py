"""Resume checkpoints and exports: atomic, newest-k, resumable at another world size, no pickle for weights.

    runs/<name>/checkpoints/step_00001000/
        ds/                          DeepSpeed engine state (model, optimizer, scheduler; ZeRO shards)
        universal/                   made on demand to resume at another world size (ds_to_universal)
        ema_rank00000.safetensors    this rank's EMA shard (train/ema.py)
        rank00000.json               this rank's data position and RNG states (+ rank00000.rng.safetensors)
        trainer.json                 step, samples seen, world size, wandb id: written last
    runs/<name>/checkpoints/latest   the newest complete checkpoint's folder name
    runs/<name>/export/              model.safetensors (EMA weights) + config.json: what sampling loads

A checkpoint is written into step_X.tmp/ by every rank and renamed by rank 0 only after all ranks
finished, so a crash mid-write never damages the newest good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from train.agreement import abort_if_a_peer_fails, agree
from train.distributed import barrier, get_rank, get_world_size, is_main
from train.init_from import export_hint
from train.safe_load import UnsafeCheckpointError, weights_only_loads
from unclip.export import is_disk_full, load_weights
from unclip.records import RecordError, read_json_object

TRAINER_STATE = "trainer.json"
DS_TAG = "ds"
UNIVERSAL_TAG = "universal"


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


CHECKPOINT_NAME = re.compile(r"step_\d{8}")  # step_X.tmp, a write in progress or cut short, never matches


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int):
        self.root = run_dir / "checkpoints"
        self.keep = max(1, keep)
        self._steps_agreed = 0  # agreed steps so far (store keys)

    # --- finding ---------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its trainer.json exists)."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.glob("step_*")
            if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and (p / TRAINER_STATE).exists()
        ]
        return sorted(found, key=lambda p: p.name)

    def remove_partial(self) -> None:
        """Remove what a save cut short left behind (step_X.tmp/): rank 0, at start."""
        if is_main() and self.root.is_dir():
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `trainer.resume` asks for: auto (newest, or none), never, or a path."""
        self.remove_partial()
        if resume == "never":
            if self.complete():
                raise CheckpointError(
                    f"{self.root.parent} already holds a run with checkpoints, and trainer.resume=never will not "
                    "overwrite it: pick another name (name=...), delete that folder, or resume it "
                    "(trainer.resume=auto)."
                )
            return None
        if resume == "auto":
            done = self.complete()
            return done[-1] if done else None
        path = Path(resume)
        if not (path / TRAINER_STATE).exists():
            raise CheckpointError(
                f"trainer.resume={resume!r} is not a complete checkpoint (no {TRAINER_STATE} in it). "
                f"Use trainer.resume=auto to take the newest one in {self.root}, or never to start fresh."
                + export_hint(path)
            )
        return path

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        try:
            return read_json_object(path / TRAINER_STATE, "checkpoint state")
        except RecordError as e:
            raise CheckpointError(f"checkpoint {path} is damaged: {e}") from None

    # --- saving ----------------------------------------------------------------------------------
    def next_tag(self, what: str) -> str:
        """A store key for one agreed step (the same on every rank: each calls in the same order)."""
        self._steps_agreed += 1
        return f"unclip/{what}/{self._steps_agreed}"

    def save(self, step: int, engine, ema, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write a checkpoint for `step` (collective: every rank calls it). A failed write (a full
        disk) on any rank reaches every rank within a second, through the rendezvous store rather than
        a collective (a rank may be waiting inside one of DeepSpeed's): the partial checkpoint is
        removed, the previous ones are kept, and every rank raises CheckpointError."""
        final = self.root / checkpoint_name(step)
        tmp = self.root / (final.name + ".tmp")
        tag = self.next_tag("save")
        failure = None
        with abort_if_a_peer_fails(tag, lambda message: self._abort_save(final, tmp, message)):
            try:
                if is_main():
                    self.remove_partial()
                    tmp.mkdir(parents=True)
                barrier()
                engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
                ema.save_shard(tmp)
                _save_rank_state(tmp, rank_state)
            except (OSError, RuntimeError, SafetensorError) as e:
                failure = _failure_text(e)
        agreed = agree(tag, failure)
        if agreed is not None:
            raise CheckpointError(self._fail_save(final, tmp, agreed))
        if is_main():
            state = trainer_state | {"world_size": get_world_size(), "saved_at": time.time()}
            _atomic_write(tmp / TRAINER_STATE, json.dumps(state, indent=2))
            if final.exists():  # re-saving the same step (a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", final.name)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def _abort_save(self, final: Path, tmp: Path, message: str) -> None:
        """A peer failed while this rank was still saving (maybe blocked in a collective): say why."""
        _say_error(self._fail_save(final, tmp, message))

    def _fail_save(self, final: Path, tmp: Path, message: str) -> str:
        """Remove the partial checkpoint (rank 0) and say why the save failed, in words: a full disk
        is named as such, with what the save needs."""
        written = _folder_size(tmp)
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(self.root).free
        previous = self.complete()
        need = max(written, _folder_size(previous[-1]) if previous else 0)
        kept = f"the previous checkpoints are kept ({', '.join(p.name for p in previous) or 'none yet'})"
        if message.startswith(DISK_FULL) or DISK_FULL in message:
            return (
                f"the disk is full: saving {final.name} in {self.root} failed with {_gb(free)} free; a checkpoint "
                f"of this run needs about {_gb(need)}. The partial checkpoint was removed and {kept}. Free space "
                f"(or lower trainer.ckpt_keep, or point runs_dir at a larger disk) and rerun the same "
                f"command to resume. ({message})"
            )
        return f"saving {final.name} in {self.root} failed ({message}). The partial checkpoint was removed and {kept}."

    # --- loading ---------------------------------------------------------------------------------
    @staticmethod
    def needs_universal(path: Path) -> bool:
        """Resuming at another world size needs DeepSpeed's universal form when the optimizer state
        is partitioned (ZeRO >= 1, or bf16, whose optimizer DeepSpeed partitions too)."""
        saved_world = CheckpointManager.read_state(path)["world_size"]
        partitioned = any((path / DS_TAG).glob("*optim_states.pt"))
        return saved_world != get_world_size() and partitioned

    @staticmethod
    def prepare_universal(path: Path) -> None:
        """Convert `path` to DeepSpeed's universal checkpoint once (rank 0; others wait)."""
        target = path / UNIVERSAL_TAG
        if is_main() and not (target / "zero").is_dir():
            tmp = path / (UNIVERSAL_TAG + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "train.safe_load",  # ds_to_universal, its torch.loads weights-only
                "--convert",
                "--input_folder",
                str(path / DS_TAG),
                "--output_folder",
                str(tmp),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CheckpointError(f"converting {path} to DeepSpeed's universal form failed:\n{done.stderr[-3000:]}")
            os.replace(tmp, target)
        barrier()

    def load(self, path: Path, engine, ema, universal: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore engine and EMA from `path`; returns (trainer state, this rank's state or None when
        the world size changed and this rank has no saved state of its own to take). Every rank
        checks the files first, and all agree on the outcome before any says it resumed: a file one
        rank refuses (damaged, or a pickle that is more than weights) stops every rank with its name."""
        tag = UNIVERSAL_TAG if universal else DS_TAG
        agreement = self.next_tag("load")
        failure, state, rank_state = None, {}, None
        with abort_if_a_peer_fails(agreement, lambda message: _say_error(f"resuming {path} failed ({message})")):
            try:
                check_files(path)
                with weights_only_loads():
                    loaded, _ = engine.load_checkpoint(
                        str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
                    )
                if loaded is None:
                    raise CheckpointError(f"DeepSpeed could not load {path / tag}")
                ema.load_shards(path)
                state = self.read_state(path)
                same_world = state["world_size"] == get_world_size()
                rank_state = _load_rank_state(path) if same_world else None
            except (UnsafeCheckpointError, CheckpointError, ValueError) as e:
                failure = str(e)
            except (RuntimeError, OSError, EOFError, KeyError) as e:  # DeepSpeed's and torch's own errors
                failure = f"{path} does not load: {type(e).__name__}: {_first_line(e)}"
        agreed = agree(agreement, failure)
        if agreed is not None:
            raise CheckpointError(agreed if failure is not None else f"resuming {path} failed ({agreed})")
        return state, rank_state


def check_files(path: Path) -> None:
    """Every file of a checkpoint is whole before anything is loaded: torch files end in their zip
    directory, safetensors headers match their sizes, JSON parses. A damaged one is named."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        what = None
        if file.suffix == ".pt" and not zipfile.is_zipfile(file):
            what = "is not a complete torch file (truncated, or not written by torch.save)"
        elif file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    f.metadata()
            except (SafetensorError, OSError) as e:
                what = f"is not a readable safetensors file ({e})"
        elif file.suffix == ".json" or file.name == TRAINER_STATE:
            try:
                read_json_object(file, "checkpoint state")
            except RecordError as e:
                what = str(e).removeprefix(f"{file}: ")
        if what:
            earlier = [p.name for p in CheckpointManager(path.parent.parent, 1).complete() if p.name < path.name]
            hint = f" Resume from an earlier one: trainer.resume={path.parent / earlier[-1]}" if earlier else ""
            raise CheckpointError(f"checkpoint {path} is damaged: {file.relative_to(path)} {what}.{hint}")


def _say_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no detail"


DISK_FULL = "disk full"


def _failure_text(error: BaseException) -> str:
    """What a rank posts when its part of a save failed; a full disk is marked as such."""
    text = f"{type(error).__name__}: {error}"
    return f"{DISK_FULL}: {text}" if is_disk_full(error) else text


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


# What a resume may change freely: how long, how often, how split, where logged. A different model or
# data source is another run and is refused; anything else (optimizer, seed, precision) is allowed
# and recorded in config_changes.jsonl.
RESUME_FREE = (
    "name",
    "runs_dir",
    "logger.",
    "distributed.",
    "data.num_workers",
    "data.prefetch_factor",
    "data.pin_memory",
    "trainer.num_steps",
    "trainer.batch_per_gpu",
    "trainer.grad_accum",
    "trainer.log_every",
    "trainer.ckpt_every",
    "trainer.ckpt_keep",
    "trainer.export_every",
    "trainer.sample_every",
    "trainer.val_every",
    "trainer.val_batches",
    "trainer.eval_every",
    "trainer.eval_batches",
    "trainer.resume",
    "trainer.max_nonfinite_steps",
    "trainer.progress",
)
RESUME_REFUSED = ("model.", "data.name", "data.shards", "data.embeddings", "data.caption_key", "data.resolution")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_jobs(saved: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(refused, recorded): the keys whose values differ between a checkpoint's job config and this
    run's, as {key: (saved, new)}: a different model or data source, and everything else that changed
    (the free keys excepted)."""
    a, b = flatten(saved), flatten(new)
    differ = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    matches = lambda key, names: any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)  # noqa: E731
    refused = {k: v for k, v in differ.items() if matches(k, RESUME_REFUSED)}
    recorded = {k: v for k, v in differ.items() if k not in refused and not matches(k, RESUME_FREE)}
    return refused, recorded


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rank_state(folder: Path, rank_state: dict[str, Any]) -> None:
    """JSON for plain values, safetensors for the RNG tensors: nothing here needs pickle to load."""
    rank = get_rank()
    rng = rank_state["rng"]
    tensors = {"torch": rng["torch"]} | {f"cuda{i}": t for i, t in enumerate(rng["cuda"])}
    save_file(tensors, str(folder / f"rank{rank:05d}.rng.safetensors"))
    py_state = rng["python"]
    np_state = rng["numpy"]
    plain = {k: v for k, v in rank_state.items() if k != "rng"} | {
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    (folder / f"rank{rank:05d}.json").write_text(json.dumps(plain))


def _load_rank_state(folder: Path) -> dict[str, Any] | None:
    rank = get_rank()
    path = folder / f"rank{rank:05d}.json"
    if not path.exists():
        return None
    plain = read_json_object(path, "rank state")
    tensors = load_weights(folder / f"rank{rank:05d}.rng.safetensors")
    py = plain.pop("python_rng")
    npy = plain.pop("numpy_rng")
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    rng = {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": (npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]),
        "torch": tensors["torch"],
        "cuda": cuda,
    }
    return plain | {"rng": rng}
