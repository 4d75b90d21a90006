"""Exponential moving average of the trained weights, sharded like ZeRO-3 under every ZeRO stage.

Each rank keeps fp32 EMA values for one contiguous slice of every parameter: under ZeRO-3 that
slice is exactly the rank's own partition (`param.ds_tensor`); under ZeRO-0/1/2 every rank holds
the full parameter and keeps the same slice that ZeRO-3 would give it. So the EMA costs 4 bytes
per parameter divided by the world size, whatever the stage, and one gather code path serves
export, sampling and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from train.distributed import get_rank, get_world_size, is_initialized


@dataclass
class EmaConfig:
    decay: float = 0.9999  # unCLIP App. C: 0.9999 for every model
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)): short runs still average sensibly
    start_step: int = 0  # before this step the EMA copies the weights
    every: int = 1  # update every N optimizer steps (the decay is compounded to match)


def _gathered(p: nn.Parameter) -> bool:
    """Whether ZeRO-3 currently holds this parameter whole in p.data."""
    status = getattr(p, "ds_status", None)
    return status is not None and status.name == "AVAILABLE"


class ShardedEMA:
    def __init__(self, module: nn.Module, cfg: EmaConfig):
        self.cfg = cfg
        self.rank, self.world = get_rank(), get_world_size()
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = dict(module.named_parameters())
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shards: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in self.names:
                self.shards[name] = self._my_slice(self.params[name]).float().clone()

    # --- layout ----------------------------------------------------------------------------------
    def _chunk(self, p: nn.Parameter) -> int:
        if self.zero3:
            return p.ds_tensor.numel()  # DeepSpeed's partition size (numel padded to the world size)
        return math.ceil(p.numel() / self.world)

    def _numel(self, p: nn.Parameter) -> int:
        return p.ds_numel if self.zero3 else p.numel()

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if self.zero3 else p.shape

    def _my_slice(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's slice of `p`, flat and padded to the chunk size (a view where possible)."""
        if self.zero3:
            return p.ds_tensor.reshape(-1)
        chunk = self._chunk(p)
        flat = p.data.reshape(-1)
        part = flat[self.rank * chunk : (self.rank + 1) * chunk]
        if part.numel() < chunk:
            part = torch.cat([part, part.new_zeros(chunk - part.numel())])
        return part

    # --- update ----------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        if step < self.cfg.start_step:
            return 0.0
        decay = self.cfg.decay
        if self.cfg.warmup:
            t = step - self.cfg.start_step
            decay = min(decay, (1 + t) / (10 + t))
        return decay**self.cfg.every

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step `step` (1-based count of steps done)."""
        if step % self.cfg.every:
            return
        decay = self.decay_at(step)
        for name in self.names:
            self.shards[name].lerp_(self._my_slice(self.params[name]).float(), 1.0 - decay)

    # --- gather ----------------------------------------------------------------------------------
    def _gather(self, name: str) -> torch.Tensor:
        """The full EMA value of one parameter, on every rank."""
        p, shard = self.params[name], self.shards[name]
        if is_initialized() and self.world > 1:
            parts = [torch.empty_like(shard) for _ in range(self.world)]
            dist.all_gather(parts, shard)
            flat = torch.cat(parts)
        else:
            flat = shard
        return flat[: self._numel(p)].view(self._shape(p))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every EMA weight in full, fp32, on the CPU (collective: every rank must call it)."""
        return {name: self._gather(name).cpu() for name in self.names}

    @contextlib.contextmanager
    def swapped_in(self):
        """Run the live module with EMA weights (sampling, validation), then put the weights back.
        Collective: every rank enters it together."""
        saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            for name in self.names:
                p = self.params[name]
                if self.zero3:
                    # The partition is what ZeRO-3 gathers from; a parameter it keeps whole
                    # (persistent, or still gathered) gets the full EMA value too.
                    whole = _gathered(p)
                    saved[name] = (p.ds_tensor.detach().clone(), p.data.detach().clone() if whole else None)
                    p.ds_tensor.copy_(self.shards[name].to(p.ds_tensor.dtype).view_as(p.ds_tensor))
                    if whole:
                        p.data.copy_(self._gather(name).to(p.dtype))
                else:
                    saved[name] = (p.data.detach().to("cpu", copy=True), None)
                    p.data.copy_(self._gather(name).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    p = self.params[name]
                    local, whole = saved[name]
                    if self.zero3:
                        p.ds_tensor.copy_(local)
                        if whole is not None:
                            p.data.copy_(whole)
                    else:
                        p.data.copy_(local.to(p.device))

    # --- checkpoint ------------------------------------------------------------------------------
    def save_shard(self, folder: Path) -> None:
        meta = {"world_size": str(self.world), "rank": str(self.rank)}
        tensors = {n: s.contiguous().cpu() for n, s in self.shards.items()}
        save_file(tensors, str(folder / f"ema_rank{self.rank:05d}.safetensors"), metadata=meta)

    def load_shards(self, folder: Path) -> None:
        """Restore from a checkpoint written at any world size: this rank reads its new slice of each
        parameter from whichever old shards hold it, one parameter at a time."""
        files = sorted(folder.glob("ema_rank*.safetensors"))
        if not files:
            raise FileNotFoundError(f"checkpoint {folder} holds no EMA shards (ema_rank*.safetensors)")
        handles = [safe_open(str(f), framework="pt") for f in files]
        if len(files) == self.world:
            with torch.no_grad():
                for name in self.names:
                    self.shards[name].copy_(handles[self.rank].get_tensor(name))
            return
        with torch.no_grad():
            for name in self.names:
                p = self.params[name]
                flat = torch.cat([h.get_tensor(name) for h in handles])[: self._numel(p)]
                chunk = self._chunk(p)
                mine = flat[self.rank * chunk : (self.rank + 1) * chunk]
                self.shards[name].zero_()
                self.shards[name][: mine.numel()].copy_(mine)
