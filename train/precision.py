"""Numeric precision of the trained model: bf16 (GPU default), fp16 with loss scaling, fp32 (CPU default).

Half precision comes two ways:
- torch.autocast over fp32 weights and an fp32 optimizer (`precision.autocast=true`, DeepSpeed's
  torch_autocast): matmuls and convolutions run in bf16, everything else and every stored tensor
  stays fp32. The faster one on a CPU with AVX-512 BF16;
- half-precision weights with fp32 master copies (DeepSpeed's bf16 / fp16 modes). With
  `precision.master=flat` (the default) the fp32 master weights and gradients of bf16 training live in
  DeepSpeed's flat buffers (its BF16_Optimizer: ZeRO-1 with fp32 gradient accumulation, which holds
  nothing back on one GPU), so the optimizer steps a few large tensors; `master=per_tensor` is
  ZeRO-0's per-tensor wrapper (FP16_UnfusedOptimizer), one fp32 copy and its kernels per parameter.
  On an H200 (2026-12-04, docs/PERFORMANCE.md) bf16 weights with the flat master trained the base64
  decoder 1.03x and the 1B prior 1.07x as fast as autocast (the per-tensor wrapper had been 0.77x),
  so `precision=auto` takes them on a GPU.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32; auto = bf16 weights (flat master) on a GPU that has it, else fp32
    tf32: bool = True  # TF32 matmuls for whatever stays fp32 on Ampere+ GPUs
    autocast: bool = False  # bf16 / fp16 by torch.autocast over fp32 weights instead of half-precision weights
    master: str = "flat"  # bf16 weights: flat (fp32 master in DeepSpeed's flat buffers) | per_tensor (ZeRO-0's)


def resolve_precision(cfg: PrecisionConfig, on_gpu: bool | None = None) -> str:
    """The concrete dtype name for this machine; refuses half precision on the CPU."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision.dtype must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}")
    if cfg.master not in ("flat", "per_tensor"):
        raise ValueError(f"precision.master must be flat or per_tensor, got {cfg.master!r}")
    if cfg.dtype == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.dtype == "fp16" and not on_gpu:
        raise ValueError("precision=fp16 needs a GPU (the CPU has no fp16 kernels worth using); use fp32 or bf16")
    if cfg.dtype == "bf16" and not on_gpu and not cpu_has_native_bf16():
        warnings.warn(
            "precision=bf16 on a CPU without native bf16 (AVX512_BF16 or AMX): bf16 is emulated there, many "
            "times slower than fp32 (14x for the tiny decoder's step on an AVX2 machine): use precision=fp32",
            RuntimeWarning,
            stacklevel=2,
        )
    if cfg.autocast and cfg.dtype == "fp32":
        raise ValueError("precision.autocast=true needs a half-precision dtype (bf16 or fp16), not fp32")
    return cfg.dtype


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), where bf16 autocast is the faster
    choice (1.4x for the tiny decoder); elsewhere oneDNN emulates it, far slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: what oneDNN says
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def uses_autocast(cfg: PrecisionConfig, precision: str) -> bool:
    """Whether half precision comes by autocast over fp32 weights (asked for: auto takes bf16 weights)."""
    return precision != "fp32" and cfg.autocast


def weights_dtype(cfg: PrecisionConfig, precision: str) -> torch.dtype:
    """The dtype of the trained weights (and of the inputs a task casts to): fp32 under autocast."""
    return torch.float32 if uses_autocast(cfg, precision) else torch_dtype(precision)


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def saved_weights_dtype(state: dict) -> str | None:
    """The dtype of the weights a checkpoint's optimizer stepped ("float32", "bfloat16", "float16"), from
    its state; None when it does not say (before jobs were recorded). Checkpoints from before
    2026-12-04 do not record it: there precision=auto on a GPU meant bf16 autocast over fp32 weights."""
    if "weights_dtype" in state:
        return state["weights_dtype"]
    precision, job = state.get("precision"), state.get("job") or {}
    chosen = job.get("precision", {})
    if precision is None or not chosen:
        return None
    if precision == "fp32" or chosen.get("autocast") or chosen.get("dtype") == "auto":
        return "float32"
    return dtype_name(torch_dtype(precision))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _BatchNormInFp32:
    """A batch norm layer with half-precision weights that normalizes with fp32 statistics and affine
    parameters. DeepSpeed (0.19) casts the parameters to bf16 / fp16 and keeps the running statistics
    fp32, a mix torch's batch norm refuses ("expected scalar type BFloat16 but found Float"); fp32
    weights with a half-precision input it takes, on the CPU and on CUDA alike, as under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype == torch.float32:
            return super().forward(x)
        self._check_input_dim(x)
        for name in ("running_mean", "running_var"):  # accumulate in fp32 (older DeepSpeed casts buffers too)
            buffer = getattr(self, name)
            if buffer is not None and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        keep_stats = not self.training or self.track_running_stats
        out = F.batch_norm(
            x,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            self.weight.float(),
            self.bias.float(),
            batch_stats,
            momentum,
            self.eps,
        )
        return out.to(x.dtype)


_IN_FP32: dict[type, type] = {}


def batch_norm_in_fp32(model: torch.nn.Module) -> int:
    """Every batch norm layer of `model` (open_clip's ResNet towers have them) made to normalize in fp32
    under half-precision weights; the number changed. Their state (and so checkpoints) is unchanged."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, _BatchNormInFp32):
            if cls not in _IN_FP32:
                _IN_FP32[cls] = type(f"{cls.__name__}InFp32", (_BatchNormInFp32, cls), {})
            module.__class__ = _IN_FP32[cls]
            changed += 1
    return changed
