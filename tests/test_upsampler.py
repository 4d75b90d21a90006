"""The upsamplers: preset sizes, full-size application after crop training, degradations, training."""

from __future__ import annotations

import pytest
import torch

from tests.trainer_helpers import metrics
from train.config import compose, to_object
from train.run import run
from train.upsampler import UpsamplerTask
from unclip.degrade import DegradationConfig, gaussian_kernel, make_low_res
from unclip.diffusion import DiffusionConfig, make_generator
from unclip.unet import UNetConfig
from unclip.upsampler import Upsampler, UpsamplerConfig, load_upsampler


@pytest.mark.parametrize(
    "preset,stage,params", [("paper256", "up256", 700e6), ("paper1024", "up1024", 300e6), ("tiny", "up256", None)]
)
def test_presets_build_on_meta_with_the_papers_size(preset, stage, params):
    cfg = to_object(compose("upsampler", [f"model/upsampler={preset}", f"stage={stage}"])).model.upsampler
    with torch.device("meta"):
        up = Upsampler(cfg)
        size = cfg.crop_size
        out = up(torch.empty(1, 3, size, size), torch.zeros(1), torch.empty(1, 3, size, size))
    assert out.shape == (1, 3, size, size)
    if params:
        count = sum(p.numel() for p in up.parameters())
        assert abs(count - params) / params < 0.15, count
    assert cfg.diffusion.schedule == ("linear" if stage == "up1024" else "cosine")
    assert cfg.degradation.kind == ("bsr" if stage == "up1024" else "blur")


def _small(**kw) -> Upsampler:
    torch.manual_seed(0)
    unet = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[])
    return Upsampler(UpsamplerConfig(unet=unet, target_size=32, **kw))


def test_runs_at_a_larger_size_than_it_trained_on():
    up = _small(diffusion=DiffusionConfig(target="x0", sample_steps="ddim3", sampler="ddim"))
    low = torch.rand(2, 3, 12, 20) * 2 - 1  # not even square: fully convolutional
    out = up.sample(low, generator=make_generator(0))
    assert out.shape == (2, 3, 48, 80)


def test_attention_is_refused():
    with pytest.raises(ValueError, match="fully convolutional"):
        Upsampler(UpsamplerConfig(unet=UNetConfig(attention_resolutions=[16])))


def test_blur_degradation_is_unclips_kernel():
    k = gaussian_kernel(3, 0.6, dtype=torch.float64)
    assert k.sum().item() == pytest.approx(1.0) and k[1] > k[0] == k[2]
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    a = make_low_res(hr, 4, DegradationConfig(kind="blur"))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, make_low_res(hr, 4, DegradationConfig(kind="blur")))


def test_bsr_degradation_is_deterministic_for_a_seed():
    cfg = DegradationConfig(kind="bsr")
    hr = torch.rand(3, 3, 64, 64) * 2 - 1
    a = make_low_res(hr, 4, cfg, make_generator(7))
    b = make_low_res(hr, 4, cfg, make_generator(7))
    c = make_low_res(hr, 4, cfg, make_generator(8))
    clean = make_low_res(hr, 4, cfg, train=False)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, clean, atol=1e-3)  # degraded: blurred, noised, compressed


def test_predict_residual_needs_an_x0_target():
    with pytest.raises(ValueError, match="target=x0"):
        _small(predict_residual=True)


def test_noise_augmentation_conditions_on_its_level(synthetic_dir):
    job = to_object(compose("upsampler", ["model.upsampler.noise_aug_max=0.3"]))
    task = UpsamplerTask(job)
    task.ctx = None
    crops = torch.zeros(4, 3, 16, 16)
    cond, levels = task.conditioning(crops)
    assert levels.shape == (4,) and levels.min() >= 0 and levels.max() <= 0.3
    assert Upsampler(job.model.upsampler).unet.cfg.noise_level_cond


def test_upsampler_trains_on_crops_and_samples_whole_images(synthetic_dir, tmp_path):
    over = {
        "name": "up",
        "runs_dir": str(tmp_path),
        "data.shards": str(synthetic_dir / "train"),
        "data.heldout_shards": str(synthetic_dir / "heldout"),
        "data.resolution": 32,
        "data.num_workers": 0,
        "model.upsampler.target_size": 32,
        "model.upsampler.crop_fraction": 0.5,
        "trainer.num_steps": 3,
        "trainer.batch_per_gpu": 4,
        "trainer.log_every": 1,
        "trainer.val_every": 3,
        "trainer.val_batches": 1,
        "trainer.sample_every": 3,
        "trainer.ckpt_every": 0,
        "task.sample_steps": "ddim3",
        "task.sample_count": 2,
        "logger": "none",
        "model.upsampler.noise_aug_max": 0.2,
    }
    job = to_object(compose("upsampler", [f"{k}={v}" for k, v in over.items()]))
    assert run(job, UpsamplerTask(job)) == 0
    assert any("val/mse" in m for m in metrics(tmp_path / "up"))
    assert (tmp_path / "up" / "samples" / "step_00000003.png").exists()
    up = load_upsampler(tmp_path / "up" / "export")
    out = up.sample(torch.zeros(1, 3, 8, 8), steps="ddim2", generator=make_generator(0))
    assert out.shape == (1, 3, 32, 32)
