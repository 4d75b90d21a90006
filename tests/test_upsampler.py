"""The upsamplers: preset sizes, full-size application after crop training, degradations, training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.trainer_helpers import metrics
from train.config import compose, to_object
from train.run import run
from train.upsampler import UpsamplerTask
from unclip.degrade import (
    DegradationConfig,
    anisotropic_kernel,
    apply_plan,
    bsr_plan,
    gaussian_kernel,
    make_low_res,
)
from unclip.diffusion import DiffusionConfig, make_generator
from unclip.unet import UNetConfig
from unclip.upsampler import Upsampler, UpsamplerConfig, load_upsampler, upsampler_from_config


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


@pytest.mark.parametrize("kind", ["bsr", "simple"])
def test_degradation_is_a_pure_function_of_the_seed(kind):
    cfg = DegradationConfig(kind=kind)
    hr = torch.rand(3, 3, 64, 64) * 2 - 1
    a = make_low_res(hr, 4, cfg, make_generator(7))
    b = make_low_res(hr, 4, cfg, make_generator(7))
    c = make_low_res(hr, 4, cfg, make_generator(8))
    clean = make_low_res(hr, 4, cfg, train=False)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, clean, atol=1e-3)  # degraded: blurred, noised, compressed


def test_bsr_plans_follow_bsrgan():
    """Over many seeds: the shuffled order keeps the random downscale before the final resize, a
    quarter of x4 plans halve first, both kernel shapes and all three noise kinds occur, every plan
    ends in JPEG, and the result is always a quarter of the size."""
    cfg = DegradationConfig(kind="bsr")
    plans = [bsr_plan(4, cfg, make_generator(seed)) for seed in range(400)]
    half_first = sum(p[0]["op"] == "resize" and p[0]["factor"] == 2.0 for p in plans) / len(plans)
    assert 0.18 < half_first < 0.32
    orders = set()
    for plan in plans:
        ops = [s["op"] for s in plan]
        down = next(i for i, s in enumerate(plan) if s.get("mark"))
        assert down < ops.index("resize_from_mark") and ops[-1] == "jpeg" and ops.count("blur") == 2
        orders.add(tuple(o for o in ops if o != "jpeg"))
        for s in plan:
            if s["op"] == "jpeg":
                assert 30 <= s["quality"] <= 95
    assert len(orders) > 20  # shuffled
    steps = [s for p in plans for s in p]
    blurs = [s for s in steps if s["op"] == "blur"]
    assert any(s["l1"] != s["l2"] for s in blurs) and any(s["l1"] == s["l2"] for s in blurs)
    assert {s["kind"] for s in steps if s["op"] == "noise"} == {"color", "gray", "correlated"}
    assert {s["op"] for s in steps} >= {"resize", "shifted_blur_subsample"}
    hr = torch.rand(1, 3, 64, 64)
    for plan in plans[:40]:
        assert apply_plan(hr, plan, make_generator(0)).shape == (1, 3, 16, 16)


def test_anisotropic_kernel_has_the_asked_covariance():
    theta, l1, l2 = math.pi / 6, 4.0, 1.0
    k = anisotropic_kernel(41, theta, l1, l2).double()
    r = torch.arange(41, dtype=torch.float64) - 20
    y, x = torch.meshgrid(r, r, indexing="ij")
    cov = torch.tensor([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    v = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    expected = v @ torch.diag(torch.tensor([l1, l2], dtype=torch.float64)) @ v.T
    torch.testing.assert_close(cov, expected, rtol=0.02, atol=0.02)
    assert k.sum().item() == pytest.approx(1.0)


def test_upsampler_records_of_the_old_one_pass_degradation_still_load():
    old = {
        "kind": "bsr",
        "blur_kernel": 3,
        "blur_sigma": 0.6,
        "bsr_blur_sigma": [0.2, 2.0],
        "bsr_noise_std": [0.0, 0.05],
        "bsr_jpeg_quality": [30, 95],
        "bsr_resize_modes": ["bicubic"],
    }
    config = _small().export_config()
    config["upsampler"]["degradation"] = old
    cfg = upsampler_from_config(json.loads(json.dumps(config))).cfg.degradation
    assert cfg.kind == "simple" and cfg.simple_resize_modes == ["bicubic"]


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


def test_sample_grids_keep_upsampled_images_at_full_size(tmp_path):
    from PIL import Image

    from unclip.grid import save_grid

    images = torch.rand(3, 3, 160, 160) * 2 - 1
    save_grid(images, ["a", "b", "c"], 3, tmp_path / "step_00000010.png")
    sheet = Image.open(tmp_path / "step_00000010.png")
    assert sheet.width == 3 * (160 + 4) + 4  # 160 px cells, not 128
    full = sorted((tmp_path / "step_00000010").glob("*.png"))
    assert [Image.open(p).size for p in full] == [(160, 160)] * 3
    save_grid(images[:, :, :64, :64], ["a", "b", "c"], 3, tmp_path / "small.png")
    assert not (tmp_path / "small").exists()  # 64 px images are all in the grid already
