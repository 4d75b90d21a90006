"""Exponential moving average of the fp32 master weights, sharded like the optimizer under every ZeRO stage.

Each rank keeps fp32 EMA values for one contiguous range of every parameter's flat value: the range
whose fp32 master copy this rank's optimizer holds. Under half-precision training the module holds
bf16 working copies, and an update smaller than one bf16 step (~2^-8 relative, the usual case at lr
~1e-4) never reaches them: averaging them would give an "fp32 EMA" with bf16 accuracy. So the EMA
reads the master copy wherever DeepSpeed keeps one:
- ZeRO-3 (offload included): the rank's fp32 partition (`_z3_optimizer.get_local_fp32_param`), the
  same range as the parameter's own partition `p.ds_tensor`;
- ZeRO-1/2 (and DeepSpeed's BF16_Optimizer, where it is used): the fragment of the parameter that
  falls in the rank's flat fp32 partition (`p._hp_mapping`), possibly empty;
- ZeRO-0 with bf16 weights and our client AdamW (FP16_UnfusedOptimizer): its whole fp32 copy of each
  parameter (`fp32_groups`), in equal slices per rank;
- plain fp32 weights (DDP, autocast): `p.data` itself, in equal slices per rank.
The EMA costs 4 bytes per parameter divided by the world size, whatever the stage; one gather code
path serves export, sampling and checkpoints, and checkpoints record each shard's range so they load
at any world size or stage.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from train.distributed import all_reduce, get_rank, get_world_size


@dataclass
class EmaConfig:
    decay: float = 0.9999  # unCLIP App. C: 0.9999 for every model
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)): short runs still average sensibly
    start_step: int = 0  # before this step the EMA copies the weights
    every: int = 1  # update every N optimizer steps (the decay is compounded to match)


def fp32_copies(optimizer: object | None) -> dict[int, torch.Tensor]:
    """id(half-precision parameter) -> its whole fp32 master copy, for DeepSpeed's ZeRO-0 wrappers
    of a client optimizer (FP16_UnfusedOptimizer, bf16 or fp16): `fp16_groups[i][j]` is trained
    through `fp32_groups[i][j]`. Empty for any other optimizer."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list):
        return {}
    return {id(p): q for lows, highs in zip(low, high, strict=True) for p, q in zip(lows, highs, strict=True)}


def _gathered(p: nn.Parameter) -> bool:
    """Whether ZeRO-3 currently holds this parameter whole in p.data."""
    status = getattr(p, "ds_status", None)
    return status is not None and status.name == "AVAILABLE"


class ShardedEMA:
    def __init__(self, module: nn.Module, cfg: EmaConfig, optimizer: object | None = None):
        """`optimizer`: DeepSpeed's, where it keeps fp32 copies the module does not hold (ZeRO-0 bf16)."""
        self.cfg = cfg
        self.fp32_copies = fp32_copies(optimizer)
        self.rank, self.world = get_rank(), get_world_size()
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = dict(module.named_parameters())
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shards: dict[str, torch.Tensor] = {}
        self.starts: dict[str, int] = {}
        with torch.no_grad():
            for name in self.names:
                p = self.params[name]
                start, values = self._master(p)
                self.starts[name] = start
                # beside the parameter's own partition (on the CPU where ZeRO-3 offloads parameters)
                device = p.ds_tensor.device if self.zero3 else values.device
                self.shards[name] = values.to(device, torch.float32, copy=True)

    # --- layout ----------------------------------------------------------------------------------
    def _chunk(self, p: nn.Parameter) -> int:
        if self.zero3:
            return p.ds_tensor.numel()  # DeepSpeed's partition size (numel padded to the world size)
        return math.ceil(p.numel() / self.world)

    def _numel(self, p: nn.Parameter) -> int:
        return p.ds_numel if self.zero3 else p.numel()

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if self.zero3 else p.shape

    def _flat_numel(self, p: nn.Parameter) -> int:
        """Length of the flat buffer every rank's range fits in (ZeRO-3 pads the last partition)."""
        return self._chunk(p) * self.world if self.zero3 else p.numel()

    def _master(self, p: nn.Parameter) -> tuple[int, torch.Tensor]:
        """(start, values): the range of p's flat value whose master copy this rank holds, flat."""
        if self.zero3:
            master = p._z3_optimizer.get_local_fp32_param(p) if hasattr(p, "_z3_optimizer") else None
            part = p.ds_tensor if master is None else master
            return self.rank * self._chunk(p), part.reshape(-1)
        if hasattr(p, "_hp_mapping"):  # DeepSpeed's fp32 partition (ZeRO-1/2, bf16 optimizer)
            if p._hp_mapping is None:  # none of p falls in this rank's partition
                return 0, p.data.new_zeros(0, dtype=torch.float32)
            return p._hp_mapping.lp_fragment_address.start, p._hp_mapping.get_hp_fragment().reshape(-1)
        chunk = self._chunk(p)
        start = min(self.rank * chunk, p.numel())
        full = self.fp32_copies.get(id(p), p.data)
        return start, full.reshape(-1)[start : start + chunk]

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
        by_device: dict[torch.device, tuple[list, list]] = {}
        for name in self.names:
            shard = self.shards[name]
            _, values = self._master(self.params[name])
            if shard.numel():
                shards, targets = by_device.setdefault(shard.device, ([], []))
                shards.append(shard)
                targets.append(values.to(shard.device, torch.float32))
        # one fused kernel per device for every parameter, not a kernel launch per parameter
        for shards, targets in by_device.values():
            torch._foreach_lerp_(shards, targets, 1.0 - decay)

    # --- gather ----------------------------------------------------------------------------------
    def _gather(self, name: str) -> torch.Tensor:
        """The full EMA value of one parameter, on every rank (ranges are disjoint: a sum of zeros
        elsewhere is exact)."""
        p, shard, start = self.params[name], self.shards[name], self.starts[name]
        device = p.ds_tensor.device if self.zero3 else p.device
        flat = torch.zeros(self._flat_numel(p), dtype=torch.float32, device=device)
        flat[start : start + shard.numel()] = shard.to(device)
        all_reduce(flat)
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
        meta = {"world_size": str(self.world), "rank": str(self.rank), "starts": json.dumps(self.starts)}
        tensors = {n: s.contiguous().cpu() for n, s in self.shards.items()}
        save_file(tensors, str(folder / f"ema_rank{self.rank:05d}.safetensors"), metadata=meta)

    def load_shards(self, folder: Path) -> None:
        """Restore from a checkpoint written at any world size and ZeRO stage: this rank reads its
        range of each parameter from whichever old shards hold it, one parameter at a time."""
        files = sorted(folder.glob("ema_rank*.safetensors"))
        if not files:
            raise FileNotFoundError(f"checkpoint {folder} holds no EMA shards (ema_rank*.safetensors)")
        handles = [safe_open(str(f), framework="pt") for f in files]
        # Shards written before ranges were recorded hold equal slices in rank order.
        starts = [json.loads((h.metadata() or {}).get("starts", "null")) for h in handles]
        with torch.no_grad():
            for name in self.names:
                p, shard = self.params[name], self.shards[name]
                old = [h.get_tensor(name) for h in handles]
                flat = torch.zeros(max(self._flat_numel(p), sum(t.numel() for t in old)))
                for k, tensor in enumerate(old):
                    start = starts[k][name] if starts[k] is not None else k * tensor.numel()
                    flat[start : start + tensor.numel()] = tensor
                flat[self._numel(p) :] = 0  # padding holds no value
                start = self.starts[name]
                shard.copy_(flat[start : start + shard.numel()])
