"""The diffusion prior: its mask, that it learns, best-of-N, exports that sample the same in a fresh
process, and refusing embeddings from another CLIP."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from data.embed import embed_shards
from tests.trainer_helpers import ROOT, env, metrics, run_module
from train.config import compose, to_object
from train.prior import PriorTask
from train.run import run
from unclip.clip import ClipConfig, build_clip
from unclip.diffusion import make_generator
from unclip.prior import DiffusionPrior, PriorConfig, load_prior


def _prior(**kw) -> DiffusionPrior:
    torch.manual_seed(0)
    return DiffusionPrior(PriorConfig(width=32, depth=2, heads=2, **kw), embed_dim=8, text_width=12, context_length=6)


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)[:b]
    return (
        torch.randn(b, 8, generator=g),
        torch.tensor([10.0, 500.0, 990.0])[:b],
        torch.randn(b, 8, generator=g),
        torch.randn(b, 6, 12, generator=g),
        mask,
    )


def test_causal_mask_hides_later_tokens_and_padding():
    prior = _prior().eval()
    x, t, te, tt, tm = _inputs()
    seen = {}
    prior.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    prior(x, t, te, tt, tm)
    before = seen["h"].clone()
    prior(x + 1.0, t, te, tt, tm)  # the noised embedding sits at position 6 + 2
    after = seen["h"]
    torch.testing.assert_close(after[:, :8], before[:, :8])  # earlier positions cannot see it
    assert not torch.allclose(after[:, 8:], before[:, 8:])
    # padding tokens (mask False) change nothing at all
    tt2 = tt.clone()
    tt2[0, 3:] += 5.0
    torch.testing.assert_close(prior(x, t, te, tt2, tm), prior(x, t, te, tt, tm))


def test_attention_runs_on_sdpa_fused_kernels():
    """Restricted to SDPA's flash kernel (causal + padding mask, head dimension innermost), the prior runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    prior = _prior().eval()
    with torch.no_grad():
        reference = prior(*_inputs())
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.testing.assert_close(prior(*_inputs()), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keys", [44, 200])
def test_training_attention_on_a_cpu_takes_the_faster_kernel_and_the_same_values(keys, monkeypatch):
    """unclip.layers.attention: while training on a CPU with few keys SDPA runs on its math kernel
    (faster there: benchmarks.cpu_attention), otherwise on its default; either way values and gradients
    are those of softmax attention computed directly in float64, padding mask and causal alike."""
    from unclip import layers

    flash_allowed = []
    sdpa = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(
        layers.F,
        "scaled_dot_product_attention",
        lambda *a, **k: flash_allowed.append(torch.backends.cuda.flash_sdp_enabled()) or sdpa(*a, **k),
    )
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, requires_grad=True) for n in (keys, keys, keys))
    mask = torch.ones(2, 1, 1, keys, dtype=torch.bool)
    mask[0, :, :, :5] = False
    for causal, m in ((False, mask), (True, None)):
        out = layers.attention(q, k, v, m, causal)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        scores = qd @ kd.transpose(-1, -2) / math.sqrt(8)
        allowed = torch.ones(keys, keys, dtype=torch.bool).tril() if causal else m
        expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vd
        expected_grads = torch.autograd.grad(expected.pow(2).sum(), (qd, kd, vd))
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert flash_allowed == [keys > layers.CPU_MATH_ATTENTION_MAX_KEYS] * 2
    with torch.no_grad():  # sampling keeps the default kernels, which are faster in the forward pass
        layers.attention(q, k, v, mask)
    assert flash_allowed[-1] is True


def test_learned_caption_padding_leaves_causal_attention_alone(monkeypatch):
    """caption_padding=learned: padded caption tokens become learned embeddings, so every attention call
    is causal with no mask (what flash attention takes on a GPU; with a padding mask it cannot), and
    what the padded positions held no longer matters."""
    import torch.nn.functional as F

    prior = _prior(caption_padding="learned").eval()
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, t, te, tt, tm = _inputs()
    with torch.no_grad():
        out = prior(x, t, te, tt, tm)
        junk = torch.where(tm[..., None], tt, 9.0)
        torch.testing.assert_close(prior(x, t, te, junk, tm), out)
    assert calls and all(c["attn_mask"] is None and c["is_causal"] for c in calls)


def test_dropped_conditioning_ignores_the_text():
    prior = _prior().eval()
    x, t, te, tt, tm = _inputs()
    drop = torch.ones(3, dtype=torch.bool)
    a = prior(x, t, te, tt, tm, drop)
    b = prior(x, t, te * 3 + 1, tt * -2, tm, drop)
    torch.testing.assert_close(a, b)


def test_loss_falls_on_a_small_overfit_set():
    prior = _prior(normalization="stats")
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    tokens, mask = torch.randn(16, 6, 12, generator=g), torch.ones(16, 6, dtype=torch.bool)
    prior.set_stats(image, text)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    d = prior.diffusion
    losses = []
    for _ in range(150):
        x0 = prior.normalize_image(image)
        i = torch.randint(0, d.num_steps, (16,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        out = prior(d.q_sample(x0, i, noise), d.model_timesteps(i), text, tokens, mask)
        loss = d.training_loss(out, x0, d.q_sample(x0, i, noise), noise, i)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10


def test_best_of_n_keeps_the_largest_dot_product():
    prior = _prior(normalization="scale", emb_scale=1.0, use_text_tokens=False)
    text = torch.tensor([[1.0] + [0.0] * 7, [0.0, 1.0] + [0.0] * 6])
    # 3 candidates per caption: the sampler's output, as if drawn
    cands = torch.zeros(6, 8)
    cands[0, 2], cands[1, 0], cands[2, 0:2] = 1, 1, 1  # caption 0: the second aligns best
    cands[3, 1], cands[4, 3], cands[5, 4] = 1, 1, 1  # caption 1: the first

    class Fixed:
        def sample(self, *a, **k):
            return cands.clone()

    prior.diffusion.respaced = lambda steps=None: Fixed()
    out = prior.sample(text, num_candidates=3)
    torch.testing.assert_close(out[0], torch.nn.functional.normalize(cands[1], dim=0))
    torch.testing.assert_close(out[1], torch.nn.functional.normalize(cands[3], dim=0))


@pytest.mark.parametrize("preset,params", [("base", 90e6), ("paper_1b", 1.21e9)])
def test_presets_have_their_size(preset, params):
    cfg = to_object(compose("prior", [f"model/prior={preset}"])).model.prior
    with torch.device("meta"):
        prior = DiffusionPrior(cfg, embed_dim=768, text_width=768, context_length=77)
    count = sum(p.numel() for p in prior.parameters())
    assert abs(count - params) / params < 0.1, count


@pytest.fixture(scope="module")
def clip_and_embeddings(synthetic_dir, tmp_path_factory):
    """A tiny random CLIP exported, and the synthetic set's embeddings made with it."""
    root = tmp_path_factory.mktemp("prior_data")
    cfg = to_object(compose("clip")).model.clip
    torch.manual_seed(0)
    clip = build_clip(ClipConfig(**vars(cfg) | {"frozen": True}))
    clip.export(root / "clip")
    for split in ("train", "heldout"):
        embed_shards(str(synthetic_dir / split), clip, cfg, root / f"emb_{split}", batch_size=64, progress=False)
    return root


def _prior_job(synthetic_dir, root, tmp_path, name, **extra):
    return to_object(compose("prior", _prior_overrides(synthetic_dir, root, tmp_path, name, **extra)))


def _prior_overrides(synthetic_dir, root, tmp_path, name, **extra) -> list[str]:
    over = {
        "name": name,
        "runs_dir": str(tmp_path),
        "data.shards": str(synthetic_dir / "train"),
        "data.heldout_shards": str(synthetic_dir / "heldout"),
        "data.embeddings": str(root / "emb_train"),
        "data.heldout_embeddings": str(root / "emb_heldout"),
        "data.load_images": False,
        "data.num_workers": 0,
        "data.resolution": 32,
        "model.clip.checkpoint": str(root / "clip"),
        "trainer.num_steps": 3,
        "trainer.batch_per_gpu": 8,
        "trainer.log_every": 1,
        "trainer.val_every": 3,
        "trainer.val_batches": 1,
        "trainer.ckpt_every": 0,
        "task.val_steps": "4",
        "task.stats_samples": 64,
        "logger": "none",
        "model.prior.normalization": "stats",
    } | extra
    return [f"{k}={v}" for k, v in over.items()]


@pytest.mark.filterwarnings("ignore:.*singular covariance:RuntimeWarning")  # 16 samples of a 128-d CLIP
def test_trains_from_embeddings_and_the_export_samples_the_same_in_a_fresh_process(
    synthetic_dir, clip_and_embeddings, tmp_path
):
    over = {"trainer.eval_every": 3, "trainer.eval_batches": 2}
    job = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "prior", **over)
    assert run(job, PriorTask(job)) == 0
    lines = metrics(tmp_path / "prior")
    assert any("val/cos_pred_image" in m and "val/cos_text_image_baseline" in m for m in lines)
    (evaluated,) = [m for m in lines if "eval/fd_clip" in m]  # the in-training eval, in CLIP space
    assert evaluated["step"] == 3 and evaluated["eval/images"] == 16 and 0 <= evaluated["eval/clip_score"] <= 100
    export = tmp_path / "prior" / "export"
    prior = load_prior(export)
    assert prior.image_std.ne(1).any()  # the statistics travelled with the weights
    # Analytic-DPM: the export measured the EMA prior's x0 error at the 64 sampling steps, on data
    measured = prior.x0_error
    assert len(measured["timesteps"]) == 64 and measured["samples"] >= 16
    assert measured["x0_mse"][-1] > measured["x0_mse"][0] > 0  # harder to denoise from more noise
    assert "analytic_log_var" in prior.diffusion.respaced("8")._np
    text = torch.randn(2, prior.embed_dim, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(2, prior.context_length, prior.text_width, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, prior.context_length, dtype=torch.bool)
    torch.save({"text": text, "tokens": tokens, "mask": mask}, tmp_path / "inputs.pt")
    here = prior.sample(text, tokens, mask, steps="8", generator=make_generator(42))
    script = (
        "import torch, sys\n"
        "from unclip.prior import load_prior\nfrom unclip.diffusion import make_generator\n"
        f"p = load_prior({str(export)!r})\nx = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "out = p.sample(x['text'], x['tokens'], x['mask'], steps='8', generator=make_generator(42))\n"
        f"torch.save(out, {str(tmp_path / 'fresh.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), here)


def test_trains_with_the_clip_in_the_loop(synthetic_dir, clip_and_embeddings, tmp_path):
    job = _prior_job(
        synthetic_dir,
        clip_and_embeddings,
        tmp_path,
        "loop",
        **{
            "data.embeddings": "null",
            "data.heldout_embeddings": "null",
            "data.load_images": True,
            "trainer.num_steps": 2,
            "trainer.val_every": 0,
        },
    )
    assert run(job, PriorTask(job)) == 0
    assert len([m for m in metrics(tmp_path / "loop") if "loss" in m]) == 2


def test_embeddings_of_another_clip_are_refused(synthetic_dir, clip_and_embeddings, tmp_path, capsys):
    torch.manual_seed(5)
    other = build_clip(ClipConfig(**vars(to_object(compose("clip")).model.clip) | {"frozen": True}))
    other.export(tmp_path / "other_clip")
    job = _prior_job(
        synthetic_dir, clip_and_embeddings, tmp_path, "bad", **{"model.clip.checkpoint": str(tmp_path / "other_clip")}
    )
    assert run(job, PriorTask(job)) == 1
    assert "was made by CLIP" in capsys.readouterr().err


def test_a_new_run_starts_from_an_export_at_step_zero(synthetic_dir, clip_and_embeddings, tmp_path, capsys):
    """model.init_from: the export's weights (and statistics), a fresh optimizer and schedule, step 0;
    trainer.resume on an export says to use it; a misfit is listed, refused unless init_strict=false."""
    quiet = {"trainer.val_every": 0, "task.variance_samples": 0}
    src = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "src", **quiet)
    assert run(src, PriorTask(src)) == 0
    export = tmp_path / "src" / "export"
    # a learning rate too small to move anything: the new run's export is the source's
    tuned = _prior_job(
        synthetic_dir,
        clip_and_embeddings,
        tmp_path,
        "tuned",
        **quiet,
        **{"model.init_from": str(export), "trainer.num_steps": 1, "optim.lr_peak": 1e-12},
    )
    assert run(tuned, PriorTask(tuned)) == 0
    assert "tensors loaded" in capsys.readouterr().out
    assert [m["step"] for m in metrics(tmp_path / "tuned") if "loss" in m] == [1]  # from step 0
    a, b = load_prior(export).state_dict(), load_prior(tmp_path / "tuned" / "export").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)

    resumed = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "r", **{"trainer.resume": str(export)})
    assert run(resumed, PriorTask(resumed)) == 1
    assert f"model.init_from={export}" in capsys.readouterr().err

    deeper = {**quiet, "model.init_from": str(export), "trainer.num_steps": 1, "model.prior.depth": 5}
    strict = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "deeper", **deeper)
    assert run(strict, PriorTask(strict)) == 1
    assert "not in the export (kept fresh): blocks.4." in capsys.readouterr().err
    loose = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "loose", **deeper, **{"model.init_strict": False})
    assert run(loose, PriorTask(loose)) == 0
    decoder_export = {**quiet, "model.init_from": str(tmp_path / "nowhere")}
    missing = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "missing", **decoder_export)
    assert run(missing, PriorTask(missing)) == 1
    assert "no such export folder" in capsys.readouterr().err


def test_prior_grids_through_a_decoder_with_validation_prompts(synthetic_dir, clip_and_embeddings, tmp_path, capsys):
    """task.decoder draws the prior's samples for held-out captions and task.sample_prompts."""
    from PIL import Image

    from unclip.decoder import Decoder, DecoderConfig
    from unclip.export import write_export
    from unclip.unet import UNetConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    over = {"task.sample_prompts": str(prompts), "trainer.val_every": 0, "task.variance_samples": 0}
    alone = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "alone", **over)
    assert run(alone, PriorTask(alone)) == 1
    assert "needs task.decoder" in capsys.readouterr().err
    torch.manual_seed(0)
    unet = UNetConfig(image_size=16, model_channels=16, channel_mult=[1], num_res_blocks=1, attention_resolutions=[])
    decoder = Decoder(DecoderConfig(unet=unet), clip_dim=128, clip_text_width=128)
    write_export(tmp_path / "decoder", decoder.state_dict(), decoder.export_config())
    over |= {
        "task.decoder": str(tmp_path / "decoder"),
        "task.sample_count": 2,
        "task.sample_steps": "ddim2",
        "trainer.sample_every": 3,
    }
    job = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "grid", **over)
    assert run(job, PriorTask(job)) == 0
    grid = Image.open(tmp_path / "grid" / "samples" / "step_00000003.png")
    assert grid.width == 4 * (128 + 4) + 4  # 2 held-out captions + 2 prompts in one row


def test_without_a_heldout_set_the_run_warns_and_auto_holds_one_out(
    synthetic_dir, clip_and_embeddings, tmp_path, capsys
):
    none = {"data.heldout_shards": "null", "data.heldout_embeddings": "null", "trainer.num_steps": 2}
    none |= {"trainer.val_every": 2, "task.variance_samples": 0}
    job = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "none", **none)
    assert run(job, PriorTask(job)) == 0
    assert "no held-out set" in capsys.readouterr().err
    assert not any("val/cos_pred_image" in m for m in metrics(tmp_path / "none"))
    auto = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "auto", **none, **{"data.heldout": "auto"})
    assert run(auto, PriorTask(auto)) == 0
    assert "no held-out set" not in capsys.readouterr().err
    assert any("val/cos_pred_image" in m for m in metrics(tmp_path / "auto"))


def test_compiled_training_takes_the_same_steps(synthetic_dir, clip_and_embeddings, tmp_path, capsys):
    """trainer.compile runs the model through torch.compile (the eager backend here: tracing without
    code generation, so the losses must match the plain run's); ZeRO-3 is refused with a reason."""
    base = {"trainer.num_steps": 3, "trainer.val_every": 0, "task.variance_samples": 0, "trainer.deterministic": True}
    plain = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "plain", **base)
    assert run(plain, PriorTask(plain)) == 0
    compiled = {**base, "trainer.compile": True, "trainer.compile_backend": "eager"}
    losses = lambda name: [m["loss"] for m in metrics(tmp_path / name) if "loss" in m]  # noqa: E731
    for scope in ("model", "blocks"):
        over = {**compiled, "trainer.compile_scope": scope}
        job = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, scope, **over)
        wrapped = 1 if scope == "model" else job.model.prior.depth  # the whole model, or each transformer block
        assert run(job, PriorTask(job)) == 0
        assert f"torch.compile: {scope} ({wrapped} wrapped), backend eager" in capsys.readouterr().out
        assert losses(scope) == pytest.approx(losses("plain"), rel=1e-5)
        assert metrics(tmp_path / scope)[0]["first_step_s"] > 0
    z3 = _prior_job(synthetic_dir, clip_and_embeddings, tmp_path, "z3", **compiled, **{"distributed": "zero3"})
    assert run(z3, PriorTask(z3)) == 1
    assert "not supported under ZeRO-3" in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.filterwarnings("ignore:.*singular covariance:RuntimeWarning")
def test_two_ranks_reduce_every_statistic_through_the_backends_device(synthetic_dir, clip_and_embeddings, tmp_path):
    """Metrics, control, the in-training eval's Frechet sums, the EMA gather of the export and the
    checkpoint agreement at 2 ranks, with collectives that refuse what NCCL would (tests/faults.py)."""
    over = {"trainer.eval_every": 2, "trainer.eval_batches": 1, "trainer.num_steps": 2, "trainer.val_every": 2}
    done = run_module("train.prior", _prior_overrides(synthetic_dir, clip_and_embeddings, tmp_path, "two", **over), 2)
    assert done.returncode == 0, done.stderr[-4000:]
    (evaluated,) = [m for m in metrics(tmp_path / "two") if "eval/fd_clip" in m]
    assert evaluated["eval/images"] == 16 and 0 <= evaluated["eval/clip_score"] <= 100
    assert (tmp_path / "two" / "export" / "model.safetensors").is_file()
