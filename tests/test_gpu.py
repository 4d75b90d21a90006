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


@pytest.mark.parametrize("text_encoder,backend", [("none", "FLASH_ATTENTION"), ("clip", "EFFICIENT_ATTENTION")])
def test_decoder_attention_runs_on_fused_cuda_kernels(text_encoder, backend):
    """bf16 on CUDA: without a caption mask the U-Net's attention must run on flash attention; with one
    (flash takes no mask), on the memory-efficient kernel. Never on the quadratic-memory math one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.test_decoder import _decoder_inputs, _small

    dec = _small(text_encoder=text_encoder).cuda().to(torch.bfloat16).eval()
    inputs = _decoder_inputs(text_encoder, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference = dec(**inputs).float()
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            torch.testing.assert_close(dec(**inputs).float(), reference, rtol=2e-2, atol=2e-2)


def test_prior_attention_runs_on_a_fused_cuda_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.test_prior import _inputs, _prior

    prior = _prior().cuda().to(torch.bfloat16).eval()
    inputs = [x.cuda().to(torch.bfloat16) if x.is_floating_point() else x.cuda() for x in _inputs()]
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # causal + padding mask
        assert torch.isfinite(prior(*inputs).float()).all()
