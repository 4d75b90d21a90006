"""Every config group option composes and instantiates; bad keys and types fail at compose time."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data.loader import ShardLoader
from train.config import CONF_DIR, ClipJob, compose, experiment_entrypoint, to_object
from train.distributed import deepspeed_config
from train.optim import build_optimizer, build_scheduler
from train.precision import resolve_precision
from unclip.clip import build_clip
from unclip.decoder import Decoder
from unclip.prior import DiffusionPrior
from unclip.upsampler import Upsampler

COMMON = ["data", "model/clip", "optim", "distributed", "precision", "logger", "experiment", "debug"]
GROUPS = {
    "clip": COMMON,
    "prior": COMMON + ["model/prior"],
    "decoder": COMMON + ["model/decoder"],
    "upsampler": [g for g in COMMON if g != "model/clip"] + ["model/upsampler", "stage"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _cases():
    for entry, groups in GROUPS.items():
        for group in groups:
            for option in _options(group):
                if group == "experiment" and experiment_entrypoint(option) != entry:
                    continue
                yield entry, group, option


def _embeddings(synthetic_dir: Path) -> Path:
    """A small embedding folder (random vectors for the synthetic keys), made once."""
    import numpy as np

    from data.embeddings import write_part

    root = synthetic_dir / "emb_random"
    if not root.exists():
        keys = [f"{i:09d}" for i in range(40)]
        rand = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float16)
        write_part(root, "00000", keys, ["a caption"] * 40, rand, rand)
    return root


def _instantiate(job, group: str, synthetic_dir: Path) -> None:
    if group == "data":
        shards = None if not job.data.load_images else str(synthetic_dir / "train")
        next(iter(ShardLoader(job.data, batch_size=2, shards=shards, num_workers=0)))
    elif group == "model/clip":
        if job.model.clip.arch == "custom":
            build_clip(job.model.clip)
        else:
            job.model.clip.pretrained = None
            with torch.device("meta"):
                build_clip(job.model.clip, device="meta")
    elif group == "optim":
        opt = build_optimizer(torch.nn.Linear(4, 4), job.optim, "cpu")
        build_scheduler(opt, job.optim, job.trainer.num_steps)
    elif group == "distributed":
        ds = deepspeed_config(job.distributed, precision="fp32", micro_batch=2, grad_accum=1, grad_clip=1.0)
        assert ds["zero_optimization"]["stage"] == job.distributed.zero_stage
    elif group == "precision":
        assert resolve_precision(job.precision, on_gpu=True) in ("bf16", "fp16", "fp32")
    elif group == "logger":
        assert job.logger.wandb in ("online", "offline", "disabled")
    elif group == "model/prior":
        with torch.device("meta"):
            DiffusionPrior(job.model.prior, embed_dim=64, text_width=32, context_length=8)
    elif group == "model/decoder":
        with torch.device("meta"):
            Decoder(job.model.decoder, clip_dim=64, clip_text_width=32)
    elif group in ("model/upsampler", "stage"):
        with torch.device("meta"):
            Upsampler(job.model.upsampler)


def test_auto_precision_is_bf16_weights_on_a_gpu_and_fp32_on_a_cpu(monkeypatch):
    """auto takes the fastest path measured on an H200 (bf16 weights, flat fp32 master: 1.03x autocast
    for the base64 decoder, 1.07x for the 1B prior); bf16_autocast stays one override away."""
    from train.precision import PrecisionConfig, uses_autocast, weights_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    auto = PrecisionConfig(dtype="auto")
    assert resolve_precision(auto, on_gpu=True) == "bf16" and not uses_autocast(auto, "bf16")
    assert weights_dtype(auto, "bf16") == torch.bfloat16 and auto.master == "flat"
    assert resolve_precision(auto, on_gpu=False) == "fp32"
    autocast = to_object(compose("decoder", ["precision=bf16_autocast"])).precision
    assert uses_autocast(autocast, resolve_precision(autocast, on_gpu=True))


def test_batch_norm_under_half_precision_weights_normalizes_in_fp32():
    """DeepSpeed casts a model's parameters to bf16 and keeps its buffers fp32: torch's batch norm refuses
    that mix, so a ResNet CLIP tower could not train under precision=bf16 (auto on a GPU)."""
    from torch import nn

    from train.precision import batch_norm_in_fp32

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    half = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    half.load_state_dict(reference.state_dict())
    for p in half.parameters():  # what DeepSpeed 0.19 does: parameters only
        p.data = p.data.bfloat16()
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    with pytest.raises(RuntimeError, match="expected scalar type"):
        copy.deepcopy(half)(x.bfloat16())
    assert batch_norm_in_fp32(half) == 1 and batch_norm_in_fp32(half) == 0  # once
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x), atol=0.05, rtol=0.05)
    bn, ref_bn = half[1], reference[1]
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, atol=0.05, rtol=0.02)
    out.float().square().mean().backward()
    assert bn.weight.grad.dtype == torch.bfloat16 and bn.weight.grad.abs().sum() > 0
    half.eval(), reference.eval()
    torch.testing.assert_close(half(x.bfloat16()).float(), reference(x), atol=0.05, rtol=0.05)
    assert set(half.state_dict()) == set(reference.state_dict())
    # DeepSpeed before 0.19 cast the buffers too: the statistics go back to fp32 and keep accumulating
    older = copy.deepcopy(reference).train().bfloat16()
    batch_norm_in_fp32(older)
    older(x.bfloat16())
    assert older[1].running_var.dtype == torch.float32 and int(older[1].num_batches_tracked) == 2


def test_a_checkpoint_says_what_weights_its_optimizer_stepped():
    """Recorded since auto changed on the GPU; inferred for checkpoints from before, where auto meant
    bf16 autocast over fp32 weights (a resume across the change is refused: tests/test_trainer.py)."""
    from train.precision import saved_weights_dtype

    def old(precision, **chosen):
        return {"precision": precision, "job": {"precision": {"autocast": False, **chosen}}}

    assert saved_weights_dtype({"weights_dtype": "bfloat16", **old("bf16", dtype="auto")}) == "bfloat16"
    assert saved_weights_dtype(old("bf16", dtype="auto")) == "float32"
    assert saved_weights_dtype(old("bf16", dtype="bf16", autocast=True)) == "float32"
    assert saved_weights_dtype(old("bf16", dtype="bf16")) == "bfloat16"
    assert saved_weights_dtype(old("fp16", dtype="fp16")) == "float16"
    assert saved_weights_dtype(old("fp32", dtype="auto")) == "float32"
    assert saved_weights_dtype({"precision": "bf16"}) is None  # before jobs were recorded: not known


@pytest.mark.parametrize("entry,group,option", list(_cases()))
def test_every_option_composes_and_instantiates(entry, group, option, synthetic_dir):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "webdataset"):
        overrides.append(f"data.shards={synthetic_dir / 'train'}")
    if (group, option) == ("data", "embeddings"):
        overrides.append(f"data.embeddings={_embeddings(synthetic_dir)}")
    if group == "experiment" and option.startswith("paper_"):  # the recipes leave the data to the user
        overrides += [f"data.shards={synthetic_dir / 'train'}", f"data.embeddings={_embeddings(synthetic_dir)}"]
    job = to_object(compose(entry, overrides))
    assert job.name and "${" not in job.name
    _instantiate(job, group, synthetic_dir)


def test_every_experiment_is_named_for_an_entrypoint():
    for option in _options("experiment"):
        assert experiment_entrypoint(option), option


def test_groups_have_the_options_the_docs_promise():
    assert {"ddp", "zero1", "zero2", "zero3", "zero3_offload"} <= set(_options("distributed"))
    assert {"bf16", "fp16", "fp32"} <= set(_options("precision"))
    assert {"wandb", "offline", "none"} <= set(_options("logger"))
    assert {"tiny", "ViT-L-14", "ViT-H-14"} <= set(_options("model/clip"))
    assert {"tiny", "base", "paper_1b"} <= set(_options("model/prior"))
    assert {"tiny", "base64", "paper64"} <= set(_options("model/decoder"))
    assert {"tiny", "paper256", "paper1024"} <= set(_options("model/upsampler"))
    assert {"up256", "up1024"} <= set(_options("stage"))


def _message(e: BaseException) -> str:
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__
    return " | ".join(parts)


def test_misspelt_key_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose("clip", ["trainer.num_stepz=5"])
    assert "trainer.num_stepz" in _message(e.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose("clip", ["trainer.num_steps=many"])
    message = _message(e.value)
    assert "trainer.num_steps" in message and "many" in message


def test_required_values_must_be_given():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match="data.shards"):
        to_object(compose("clip", ["data=webdataset"]))


def test_unknown_key_in_a_yaml_file_fails_naming_it():
    schema = OmegaConf.structured(ClipJob)
    with pytest.raises((ConfigKeyError, ValidationError)) as e:
        OmegaConf.merge(schema, OmegaConf.create({"optim": {"lr_peek": 1.0}}))
    assert "lr_peek" in str(e.value)


def test_run_dir_is_named_by_config_not_by_clock():
    a = to_object(compose("clip"))
    b = to_object(compose("clip"))
    assert a.run_dir == b.run_dir == Path("runs") / "clip-synthetic"
    assert to_object(compose("clip", ["name=my-run"])).run_dir == Path("runs/my-run")


def test_an_unquoted_shard_range_gets_a_quoting_hint():
    from train.cli import check_overrides

    check_overrides(["train.clip", "data=webdataset", 'data.shards="/d/{00000..00009}.tar"'])  # quoted for Hydra: fine
    with pytest.raises(SystemExit) as e:
        check_overrides(["train.clip", "data.shards=/d/{00000..00009}.tar"])
    assert "'data.shards=\"/d/{00000..00009}.tar\"'" in str(e.value)
    # and the hint is right: the quoted form composes
    job = to_object(compose("clip", ['data.shards="/d/{00000..00009}.tar"']))
    assert job.data.shards == "/d/{00000..00009}.tar"


def test_a_key_given_twice_is_refused_with_the_quoting_hint_for_shards():
    from train.cli import check_overrides

    check_overrides(["train.clip", "name=a", "trainer.num_steps=3", "-m", "optim.lr_peak=1,2"])  # fine
    with pytest.raises(SystemExit, match="trainer.num_steps is given twice"):
        check_overrides(["train.clip", "trainer.num_steps=3", "+trainer.num_steps=4"])
    # what the shell makes of an unquoted data.shards=d/{00000..00002}.tar
    expanded = [f"data.shards=d/{i:05d}.tar" for i in range(3)]
    with pytest.raises(SystemExit) as e:
        check_overrides(["train.clip", *expanded])
    assert "data.shards is given twice" in str(e.value) and "the shell expanded it" in str(e.value)


# unCLIP App. C / Table 3, per stage: (entrypoint, experiment, lr, betas, eps, weight decay, batch, steps)
PAPER = {
    "prior": ("prior", "paper_prior", 1.1e-4, [0.9, 0.96], 1e-6, 0.06, 4096, 600_000),
    "decoder": ("decoder", "paper_decoder", 1.2e-4, [0.9, 0.999], 1e-8, 0.0, 2048, 800_000),
    "up256": ("upsampler", "paper_up256", 1.2e-4, [0.9, 0.999], 1e-8, 0.0, 1024, 1_000_000),
    "up1024": ("upsampler", "paper_up1024", 1.0e-4, [0.9, 0.999], 1e-8, 0.0, 512, 1_000_000),
}
DATA = ["data.shards=/data/x", "data.embeddings=/data/x-emb"]


@pytest.mark.parametrize("stage", list(PAPER))
def test_the_papers_recipe_is_one_override(stage):
    entry, experiment, lr, betas, eps, wd, batch, steps = PAPER[stage]
    job = to_object(compose(entry, [f"experiment={experiment}", *DATA]))
    assert (job.optim.lr_peak, job.optim.betas, job.optim.eps, job.optim.weight_decay) == (lr, betas, eps, wd)
    assert (job.trainer.batch_global, job.trainer.num_steps, job.trainer.ema.decay) == (batch, steps, 0.9999)
    assert job.precision.dtype == "bf16"
    if entry == "prior":
        p = job.model.prior
        assert (p.width, p.depth, p.num_candidates, p.cond_drop_prob) == (2048, 24, 2, 0.1)
        assert (p.diffusion.schedule, p.diffusion.target, p.diffusion.sample_steps) == ("cosine", "x0", "64")
        assert p.diffusion.variance == "analytic" and job.model.clip.arch == "ViT-H-14"
    elif entry == "decoder":
        d = job.model.decoder
        assert (d.unet.model_channels, d.unet.num_res_blocks, d.unet.channel_mult) == (512, 3, [1, 2, 3, 4])
        assert (d.unet.attention_resolutions, d.unet.num_head_channels, d.unet.dropout) == ([32, 16, 8], 64, 0.1)
        assert (d.text_encoder, d.text_transformer.context_length, d.unet.pooled_text) == ("transformer", 256, True)
        assert (d.image_drop_prob, d.text_drop_prob, d.diffusion.sample_steps) == (0.1, 0.5, "250")
        assert d.diffusion.learn_sigma and d.diffusion.schedule == "cosine"
    else:
        u = job.model.upsampler
        expect = {
            "up256": (320, 3, [1, 2, 3, 4], 0.1, "cosine", "ddim27", "blur", 256),
            "up1024": (192, 2, [1, 1, 2, 2, 4, 4], 0.0, "linear", "ddim15", "bsr", 1024),
        }[stage]
        got = (u.unet.model_channels, u.unet.num_res_blocks, u.unet.channel_mult, u.unet.dropout)
        got += (u.diffusion.schedule, u.diffusion.sample_steps, u.degradation.kind, u.target_size)
        assert got == expect and u.unet.attention_resolutions == [] and u.crop_fraction == 0.25


def test_model_presets_get_the_papers_optimizer_without_an_experiment():
    """The defaults list puts the optimizer before the stage and the experiment, and the entrypoint's
    own block no longer follows it: model/decoder=paper64 alone trains with App. C's AdamW."""
    for entry, over, lr in (
        ("decoder", ["model/decoder=paper64"], 1.2e-4),
        ("upsampler", ["model/upsampler=paper256"], 1.2e-4),
        ("upsampler", ["model/upsampler=paper1024", "stage=up1024"], 1.0e-4),
    ):
        optim = to_object(compose(entry, over)).optim
        assert (optim.lr_peak, optim.betas, optim.eps, optim.weight_decay) == (lr, [0.9, 0.999], 1e-8, 0.0), entry
    assert to_object(compose("prior", ["optim=prior_paper"])).optim.betas == [0.9, 0.96]


def test_a_recipe_takes_the_users_clip_and_overrides():
    job = to_object(
        compose("decoder", ["experiment=paper_decoder", "model/clip=ViT-L-14", *DATA[:1], "optim.lr_peak=3e-4"])
    )
    assert job.model.clip.arch == "ViT-L-14" and job.optim.lr_peak == 3e-4


def test_debug_fast_logs_to_wandb_only_when_asked():
    assert to_object(compose("clip", ["debug=fast"])).logger.wandb == "disabled"
    assert to_object(compose("clip", ["debug=fast", "logger=offline"])).logger.wandb == "offline"
