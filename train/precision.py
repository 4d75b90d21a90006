"""Numeric precision of the trained model: bf16 (GPU default), fp16 with loss scaling, fp32 (CPU default).

Half precision comes two ways: half-precision weights with fp32 master copies in the optimizer
(DeepSpeed's bf16 / fp16 modes, the default), or torch.autocast over fp32 weights and an fp32
optimizer (`precision.autocast=true`, DeepSpeed's torch_autocast): matmuls and convolutions run in
bf16, everything else and every stored tensor stays fp32. On a CPU with AVX-512 BF16 the second is
the faster one (no half-precision optimizer wrapper), e.g. `precision=bf16_autocast` for make demo."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32; auto = bf16 on a GPU that has it, else fp32
    tf32: bool = True  # TF32 matmuls for whatever stays fp32 on Ampere+ GPUs
    autocast: bool = False  # bf16 / fp16 by torch.autocast over fp32 weights instead of half-precision weights


def resolve_precision(cfg: PrecisionConfig, on_gpu: bool | None = None) -> str:
    """The concrete dtype name for this machine; refuses half precision on the CPU."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision.dtype must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}")
    if cfg.dtype == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if cfg.dtype == "fp16" and not on_gpu:
        raise ValueError("precision=fp16 needs a GPU (the CPU has no fp16 kernels worth using); use fp32 or bf16")
    if cfg.autocast and cfg.dtype == "fp32":
        raise ValueError("precision.autocast=true needs a half-precision dtype (bf16 or fp16), not fp32")
    return cfg.dtype


def weights_dtype(cfg: PrecisionConfig, precision: str) -> torch.dtype:
    """The dtype of the trained weights (and of the inputs a task casts to): fp32 under autocast."""
    return torch.float32 if cfg.autocast else torch_dtype(precision)


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
