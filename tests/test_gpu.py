"""CUDA paths a CPU cannot show: bf16 and fp16 training under DeepSpeed, MFU. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainer_helpers import clip_overrides, metrics, run_clip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI and the dev machine have none"),
]


@pytest.mark.parametrize("precision,zero", [("bf16", "zero2"), ("fp16", "zero2"), ("bf16", "zero3")])
def test_half_precision_training_on_gpu(synthetic_dir, tmp_path, precision, zero):
    over = clip_overrides(synthetic_dir, tmp_path, "gpu", 6, **{"precision": precision, "distributed": zero})
    done = run_clip(over, DS_ACCELERATOR="cuda")
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [m for m in metrics(tmp_path / "gpu") if "loss" in m]
    assert len(lines) == 6 and all(math.isfinite(m["loss"]) for m in lines)
    assert lines[-1]["gpu_mem_gb"] > 0
    if "H100" in torch.cuda.get_device_name() or "A100" in torch.cuda.get_device_name():
        assert 0 < lines[-1]["mfu"] < 1
