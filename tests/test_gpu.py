"""CUDA paths a CPU cannot show: half-precision training under DeepSpeed, the fused attention kernels,
the speed settings on a GPU. Skipped without a GPU; all of them together take under 3 minutes on one.

The training runs are in-process (one CUDA context and one DeepSpeed import for all of them): each a
few steps of the tiny CLIP or decoder, which is what these tests are about, not speed."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainer_helpers import clip_job, metrics
from train.clip import train as train_clip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI and the dev machine have none"),
]


@pytest.mark.parametrize(
    "precision,zero",
    [("auto", "ddp"), ("bf16", "ddp"), ("bf16", "zero2"), ("fp16", "zero2"), ("bf16", "zero3")],
    ids=["auto_is_bf16_flat_master", "bf16_flat_master", "bf16_zero2", "fp16_zero2", "bf16_zero3"],
)
def test_half_precision_training_on_gpu(synthetic_dir, tmp_path, precision, zero):
    job = clip_job(synthetic_dir, tmp_path, "gpu", 4, **{"precision": precision, "distributed": zero})
    assert train_clip(job) == 0
    lines = [m for m in metrics(tmp_path / "gpu") if "loss" in m]
    assert len(lines) == 4 and all(math.isfinite(m["loss"]) for m in lines)
    assert lines[-1]["gpu_mem_gb"] > 0
    assert 0 < lines[-1]["mfu"] < 1
    assert (tmp_path / "gpu" / "export" / "model.safetensors").is_file()


def test_the_speed_settings_train_on_gpu(tmp_path):
    """channels_last and inductor's fused GroupNorm + SiLU kernels (Triton, on the GPU): the tiny
    decoder's losses stay within bf16 rounding of the plain run's. Per-block compilation is the CPU
    golden test's (aot_eager); on the GPU, inductor compiling the tiny decoder's 13 blocks ran past
    2 minutes (2026-12-04), too long for this suite: the matrix times the compiled scopes."""
    from tests.test_golden import golden_run

    plain = golden_run(tmp_path, "plain", precision="bf16_autocast")
    fast = {"trainer.channels_last": True, "trainer.compile": True, "trainer.compile_scope": "norm_act"}
    assert golden_run(tmp_path, "fast", precision="bf16_autocast", **fast) == pytest.approx(plain, rel=2e-2)


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


def test_learned_caption_padding_runs_on_flash_attention():
    """caption_padding=learned, decoder and prior: no mask reaches attention, so CUDA's flash kernel
    alone runs them (with a padding mask it refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.test_decoder import _decoder_inputs, _small
    from tests.test_prior import _inputs, _prior

    dec = _small(text_encoder="clip", unet_extra={"caption_padding": "learned"}).cuda().to(torch.bfloat16).eval()
    prior = _prior(caption_padding="learned").cuda().to(torch.bfloat16).eval()
    inputs = [x.cuda().to(torch.bfloat16) if x.is_floating_point() else x.cuda() for x in _inputs()]
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        assert torch.isfinite(dec(**_decoder_inputs("clip", device="cuda", dtype=torch.bfloat16)).float()).all()
        assert torch.isfinite(prior(*inputs).float()).all()


def test_prior_attention_runs_on_a_fused_cuda_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.test_prior import _inputs, _prior

    prior = _prior().cuda().to(torch.bfloat16).eval()
    inputs = [x.cuda().to(torch.bfloat16) if x.is_floating_point() else x.cuda() for x in _inputs()]
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # causal + padding mask
        assert torch.isfinite(prior(*inputs).float()).all()


def test_collectives_stage_cpu_tensors_on_the_gpu_under_nccl():
    """A CPU float64 statistic through train.distributed's staging under NCCL: copied to the GPU,
    reduced, copied back (NCCL itself refuses CPU tensors, even in a group of one)."""
    import torch.distributed as dist

    from train.distributed import comm_device, staged_all_reduce

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    assert comm_device().type == "cuda"
    with pytest.raises((RuntimeError, ValueError)):  # what the helper spares its callers
        dist.all_reduce(torch.ones(2, dtype=torch.float64))
    stat = torch.full((2, 2), 2.0, dtype=torch.float64)
    staged_all_reduce(stat)
    assert stat.device.type == "cpu" and stat.sum() == 8
