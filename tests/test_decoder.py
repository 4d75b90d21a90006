"""The decoder: preset shapes and sizes, guidance dropout, learning, the hybrid loss, inpainting, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.reference import check_hybrid_loss
from tests.trainer_helpers import metrics
from train.config import compose, to_object
from train.decoder import DecoderTask
from train.run import run
from unclip.decoder import Decoder, DecoderConfig, load_decoder
from unclip.diffusion import DiffusionConfig, make_generator
from unclip.masks import random_masks
from unclip.text_transformer import TextTransformerConfig
from unclip.unet import UNetConfig


def _small(inpaint: bool = False, unet_extra: dict | None = None, **kw) -> Decoder:
    torch.manual_seed(0)
    unet = UNetConfig(
        **(unet_extra or {}),
        image_size=16,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        num_head_channels=8,
        dropout=0.0,
        inpaint=inpaint,
    )
    return Decoder(DecoderConfig(unet=unet, **kw), clip_dim=8, clip_text_width=12)


@pytest.mark.parametrize("preset,unet_params", [("tiny", None), ("base64", 318e6), ("paper64", 2.3e9)])
def test_presets_build_on_meta_with_the_papers_size(preset, unet_params):
    cfg = to_object(compose("decoder", [f"model/decoder={preset}"])).model.decoder
    with torch.device("meta"):
        dec = Decoder(cfg, clip_dim=768, clip_text_width=768)
        x = torch.empty(2, 3, 64, 64)
        out = dec(
            x,
            torch.zeros(2),
            torch.empty(2, 768),
            text_tokens=torch.empty(2, 77, 768),
            text_mask=torch.ones(2, 77, dtype=torch.bool),
        )
    channels = 6 if cfg.diffusion.learn_sigma else 3
    assert out.shape == (2, channels, 64, 64)
    if unet_params:
        count = sum(p.numel() for p in dec.unet.parameters())
        assert abs(count - unet_params) / unet_params < 0.15, count


def test_paper_decoder_with_glide_text_transformer_is_3_5b():
    cfg = to_object(compose("decoder", ["model/decoder=paper64", "model.decoder.text_encoder=transformer"]))
    with torch.device("meta"):
        dec = Decoder(cfg.model.decoder, clip_dim=768, clip_text_width=768)
        out = dec(
            torch.empty(1, 3, 64, 64),
            torch.zeros(1),
            torch.empty(1, 768),
            token_ids=torch.zeros(1, 256, dtype=torch.long),
        )
    assert out.shape == (1, 6, 64, 64)
    assert cfg.model.decoder.text_transformer.context_length == 256  # unCLIP Table 3
    total = sum(p.numel() for p in dec.parameters())
    assert abs(total - 3.5e9) / 3.5e9 < 0.15, total


def test_output_refine_blends_the_stems_cells():
    """With a space-to-depth stem, the last layer predicts each cell's pixels apart; output_refine's
    full-resolution convolution lets a cell's features reach the pixels of the cells beside it (and
    learned sigma keeps its doubled channels). Without a stem there are no cells to blend: refused."""
    import torch.nn.functional as F

    from unclip.unet import UNet

    cfg = dict(image_size=16, model_channels=16, channel_mult=[1], num_res_blocks=1, attention_resolutions=[])
    unet = UNet(UNetConfig(**cfg, input_patch=4, output_refine=8), learn_sigma=True)
    assert unet(torch.randn(2, 3, 16, 16), torch.tensor([5, 500])).shape == (2, 6, 16, 16)
    features = torch.zeros(1, 8 * 16, 4, 4)
    features[:, :, 0, 1] = 1.0  # the cell at row 0, column 1: pixels 0-3 x 4-7
    with torch.no_grad():
        alone = F.pixel_shuffle(features, 4)
        blended = unet.refine(alone) - unet.refine(torch.zeros_like(alone))
    assert alone[..., :4, 3].abs().sum() == 0 and blended[..., :4, 3].abs().sum() > 0
    with pytest.raises(ValueError, match="input_patch"):
        UNet(UNetConfig(**cfg, output_refine=8))


def test_guidance_dropout_rates_and_independence(synthetic_dir):
    job = to_object(compose("decoder"))
    task = DecoderTask(job)
    torch.manual_seed(0)
    image, text = zip(*(task.drop_masks(64, torch.device("cpu")) for _ in range(300)))
    image, text = torch.cat(image).float(), torch.cat(text).float()
    assert image.mean().item() == pytest.approx(0.1, abs=0.01)
    assert text.mean().item() == pytest.approx(0.5, abs=0.015)
    assert (image * text).mean().item() == pytest.approx(0.05, abs=0.01)  # independent: 0.1 x 0.5


def _perturbed(dec: Decoder, seed: int = 0) -> Decoder:
    """Move every weight off its initialization (the output layers start at zero, hiding all inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return dec


def test_dropped_conditioning_is_ignored():
    dec = _perturbed(_small(text_encoder="clip")).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([5.0, 700.0])
    emb, tok = torch.randn(2, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    yes = torch.ones(2, dtype=torch.bool)
    a = dec(x, t, emb, tok, mask, drop_image=yes, drop_text=yes)
    b = dec(x, t, -emb, tok * 3, mask, drop_image=yes, drop_text=yes)
    torch.testing.assert_close(a, b)
    c = dec(x, t, emb, tok * 3, mask, drop_text=yes)  # caption dropped, image kept: the image matters
    assert not torch.allclose(a, c)


def test_learned_sigma_loss_matches_the_reference():
    dec = _small(diffusion=DiffusionConfig(learn_sigma=True, target="eps"), text_encoder="none").double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (3, 3, 16, 16), generator=g).double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    i = torch.tensor([0, 10, 900])
    x_t = dec.diffusion.q_sample(x0, i, noise)
    _perturbed(dec)
    with torch.no_grad():
        out = dec(x_t, dec.diffusion.model_timesteps(i), torch.randn(3, 8, generator=g, dtype=torch.float64))
    loss, terms = dec.diffusion.training_loss(out, x0, x_t, noise, i)
    check_hybrid_loss(dec.diffusion, out, x0, x_t, noise, i, loss, terms)


def test_loss_falls_on_a_tiny_overfit_set():
    dec = _small(diffusion=DiffusionConfig(target="x0"), text_encoder="none")
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    emb = torch.randn(8, 8, generator=g)
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3)
    d = dec.diffusion
    losses = []
    for _ in range(120):
        i = torch.randint(0, 1000, (8,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = d.q_sample(x0, i, noise)
        loss = d.training_loss(dec(x_t, d.model_timesteps(i), emb), x0, x_t, noise, i)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:10])


def _decoder_inputs(text_encoder: str, device="cpu", dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "x": torch.randn(2, 3, 16, 16, generator=g),
        "t": torch.tensor([10.0, 500.0]),
        "image_embed": torch.randn(2, 8, generator=g),
    }
    if text_encoder == "clip":  # caption tokens with padding: a boolean mask in every attention layer
        inputs["text_tokens"] = torch.randn(2, 5, 12, generator=g)
        inputs["text_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("text_encoder", ["none", "clip"])
def test_attention_runs_on_sdpa_fused_kernels(text_encoder):
    """Restricted to SDPA's flash kernel, the forward still runs: with the head dimension not innermost,
    every fused kernel refuses and SDPA falls back to the quadratic-memory math one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dec = _small(text_encoder=text_encoder).eval()
    with torch.no_grad():
        inputs = _decoder_inputs(text_encoder)
        reference = dec(**inputs)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.testing.assert_close(dec(**inputs), reference, rtol=1e-4, atol=1e-5)


def test_glide_text_transformer_reads_token_ids():
    dec = _small(
        text_encoder="transformer",
        text_transformer=TextTransformerConfig(width=16, layers=1, heads=2, context_length=10),
    )
    ids = dec.text.tokenizer()(["a red circle", "a big blue star on a white background"])
    out = dec(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.randn(2, 8), token_ids=ids)
    assert out.shape == (2, 6, 16, 16)  # learned sigma (the default): prediction and variance


def test_inpainting_masks_are_rectangles_and_strokes_and_repeat_for_a_seed():
    a, b = random_masks(64, 32, seed=3), random_masks(64, 32, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, random_masks(64, 32, seed=4))
    holes = 1 - a[:, 0]
    empty = holes.flatten(1).all(dim=1)
    assert 0 < empty.sum() < 20  # some "nothing known" masks keep plain generation in training
    partial = holes[~empty]
    rows_full = partial.any(dim=2).sum(dim=1) * partial.any(dim=1).sum(dim=1) == partial.sum(dim=(1, 2))
    assert rows_full.any() and (~rows_full).any()  # boxes (hole = its bounding box) and free-form strokes


def test_inpainting_decoder_sees_the_known_region():
    dec = _perturbed(_small(inpaint=True, text_encoder="none"))
    x, t, emb = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 500.0]), torch.randn(2, 8)
    mask = random_masks(2, 16, seed=0)
    with torch.no_grad():
        a = dec(x, t, emb, inpaint_image=x, inpaint_mask=mask)
        b = dec(x, t, emb, inpaint_image=x * 0 + 0.5, inpaint_mask=mask)
    assert not torch.allclose(a, b)


@pytest.fixture
def decoder_job(synthetic_dir, tmp_path):
    def make(name, **extra):
        over = {
            "name": name,
            "runs_dir": str(tmp_path),
            "data.shards": str(synthetic_dir / "train"),
            "data.heldout_shards": str(synthetic_dir / "heldout"),
            "data.resolution": 32,
            "data.num_workers": 0,
            "model.decoder.unet.image_size": 32,
            "trainer.num_steps": 3,
            "trainer.batch_per_gpu": 4,
            "trainer.log_every": 1,
            "trainer.val_every": 3,
            "trainer.val_batches": 1,
            "trainer.sample_every": 3,
            "trainer.ckpt_every": 0,
            "task.sample_steps": "ddim4",
            "task.sample_count": 2,
            "logger": "none",
        } | extra
        return to_object(compose("decoder", [f"{k}={v}" for k, v in over.items()]))

    return make


@pytest.mark.filterwarnings("ignore:.*singular covariance:RuntimeWarning")  # 4 samples of a 128-d CLIP
def test_decoder_trains_validates_samples_and_exports(decoder_job, tmp_path):
    job = decoder_job("dec", **{"model.decoder.unet.inpaint": True, "trainer.eval_every": 3})
    assert run(job, DecoderTask(job)) == 0
    lines = metrics(tmp_path / "dec")
    assert any("val/mse" in m for m in lines) and any("decoder/mse" in m for m in lines)
    assert any("eval/fd_clip" in m and "eval/clip_score" in m for m in lines)
    assert (tmp_path / "dec" / "samples" / "step_00000003.png").exists()
    dec = load_decoder(tmp_path / "dec" / "export")
    emb = torch.randn(2, dec.clip_dim)
    a = dec.sample(emb, steps="ddim3", generator=make_generator(0))
    b = dec.sample(emb, steps="ddim3", generator=make_generator(0))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and a.abs().max() <= 1


def test_decoder_with_clip_caption_tokens_trains(decoder_job, tmp_path):
    job = decoder_job(
        "captions",
        **{
            "model/decoder": "base64",
            "model.decoder.unet.image_size": 32,
            "model.decoder.unet.model_channels": 16,
            "model.decoder.unet.channel_mult": "[1,2]",
            "model.decoder.unet.attention_resolutions": "[16]",
            "model.decoder.unet.num_head_channels": 8,
            "trainer.num_steps": 2,
            "trainer.val_every": 0,
            "trainer.sample_every": 0,
        },
    )
    assert job.model.decoder.text_encoder == "clip" and job.model.decoder.diffusion.learn_sigma
    assert run(job, DecoderTask(job)) == 0
    assert any("decoder/vb" in m for m in metrics(tmp_path / "captions"))


def test_clip_in_the_loop_embeds_what_data_embed_embeds(decoder_job):
    """The loader reads at CLIP's resolution (32 px here), CLIP embeds that, the decoder trains on
    it downsampled (16 px): the embedding equals the precomputed one for the same sample."""
    from data.embed import embed_shard
    from data.loader import ShardLoader, list_shards
    from train.task import TaskContext

    job = decoder_job("in-loop", **{"data.resolution": 16, "model.decoder.unet.image_size": 16})
    task = DecoderTask(job)
    task.setup(TaskContext(torch.device("cpu"), torch.float32, 0, 1, 0))
    data = task.data_config(job.data)
    assert task.clip.image_size == (32, 32) and data.resolution == 32
    url = list_shards(job.data.heldout_shards)[0]
    batch = next(iter(ShardLoader(data, batch_size=6, shards=url, repeat=False, shuffle=False, crop="center")))
    images, embed = task.inputs(batch)
    assert images.shape[-2:] == (16, 16)
    reference = embed_shard(task.clip, url, batch_size=6, dtype=torch.float32)
    by_key = dict(zip(reference["keys"], reference["img"], strict=True))
    expected = torch.from_numpy(np.stack([by_key[k] for k in batch["key"]]))
    torch.testing.assert_close(embed, expected, rtol=1e-5, atol=1e-5)


def test_resolution_mismatch_is_a_clear_error(decoder_job, capsys):
    job = decoder_job("bad", **{"data.resolution": 48})
    assert run(job, DecoderTask(job)) == 1
    assert "set data.resolution=32" in capsys.readouterr().err


def test_a_prior_of_another_width_is_refused(decoder_job, tmp_path, capsys):
    from unclip.export import write_export
    from unclip.prior import DiffusionPrior, PriorConfig

    prior = DiffusionPrior(PriorConfig(width=16, depth=1, heads=2), embed_dim=7, text_width=4, context_length=3)
    write_export(tmp_path / "prior", prior.state_dict(), prior.export_config())
    job = decoder_job("p", **{"task.prior": str(tmp_path / "prior")})
    assert run(job, DecoderTask(job)) == 1
    assert "7-d" in capsys.readouterr().err


def test_a_prior_trained_with_another_clip_is_refused(decoder_job, tmp_path, capsys):
    from unclip.export import write_export
    from unclip.prior import DiffusionPrior, PriorConfig

    job = decoder_job("p", **{"task.prior": str(tmp_path / "prior")})
    embed_dim = 128  # the tiny CLIP's width: only the fingerprint tells them apart
    prior = DiffusionPrior(PriorConfig(width=16, depth=1, heads=2), embed_dim=embed_dim, text_width=4, context_length=3)
    write_export(tmp_path / "prior", prior.state_dict(), prior.export_config() | {"clip_fingerprint": "0123abcd"})
    assert run(job, DecoderTask(job)) == 1
    err = capsys.readouterr().err
    assert "was trained with CLIP 0123abcd" in err and "this decoder's CLIP" in err


def test_validation_prompts_join_the_sample_grid(decoder_job, tmp_path, capsys):
    """task.sample_prompts: the user's captions decoded through task.prior in every grid (diffusers'
    --validation_prompts); without a prior they cannot be, and the job says so."""
    from PIL import Image

    from unclip.export import write_export
    from unclip.prior import DiffusionPrior, PriorConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square on a white background\na green star\n")
    no_prior = decoder_job("np", **{"task.sample_prompts": str(prompts)})
    assert run(no_prior, DecoderTask(no_prior)) == 1
    assert "needs task.prior" in capsys.readouterr().err
    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(width=16, depth=1, heads=2), embed_dim=128, text_width=128, context_length=24)
    write_export(tmp_path / "prior", prior.state_dict(), prior.export_config())
    job = decoder_job("vp", **{"task.prior": str(tmp_path / "prior"), "task.sample_prompts": str(prompts)})
    assert run(job, DecoderTask(job)) == 0
    grid = Image.open(tmp_path / "vp" / "samples" / "step_00000003.png")
    # 2 held-out scenes x (real, reconstruction, from the caption) + 3 prompts, 2 columns: 5 rows
    row = (grid.height - 4) / 5
    assert row == int(row) and row > 128


def test_activation_checkpointing_changes_nothing_but_memory():
    """Per-block recomputation (unet / prior / text transformer `checkpointing`) gives the same loss and
    gradients, dropout included (its RNG state is replayed)."""
    from unclip.prior import DiffusionPrior, PriorConfig
    from unclip.unet import UNet

    def grads(build, call, on: bool):
        torch.manual_seed(0)
        net = build(on).train()
        calls = []
        blocks = [m for m in net.modules() if type(m).__name__ == "TransformerBlock"]
        block = blocks[0] if blocks else net.middle  # (a U-Net's stem is never recomputed: nothing to save)
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation may stop early)
        torch.manual_seed(1)
        loss = call(net).float().pow(2).mean()
        loss.backward()
        assert len(calls) == (2 if on else 1)  # recomputed in the backward pass only when on
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    unet = lambda on: UNet(
        UNetConfig(
            image_size=16,
            model_channels=16,
            channel_mult=[1, 2],
            num_res_blocks=1,  # noqa: E731
            attention_resolutions=[8],
            num_head_channels=8,
            dropout=0.2,
            clip_dim=8,
            text_width=12,
            checkpointing=on,
        ),
        True,
    )
    x, t, e, tok = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), torch.randn(2, 8), torch.randn(2, 5, 12)
    prior = lambda on: DiffusionPrior(PriorConfig(width=32, depth=2, heads=2, dropout=0.2, checkpointing=on), 8, 12, 5)  # noqa: E731
    text = lambda on: Decoder(
        DecoderConfig(
            unet=UNetConfig(
                image_size=8,
                model_channels=16,
                channel_mult=[1],  # noqa: E731
                num_res_blocks=1,
                attention_resolutions=[8],
                num_head_channels=8,
            ),
            text_encoder="transformer",
            text_transformer=TextTransformerConfig(width=16, layers=2, heads=2, context_length=8, checkpointing=on),
        ),
        8,
        12,
    )
    ids = torch.randint(1, 100, (2, 8))
    cases = [
        (unet, lambda net: net(x, t, e, tok, torch.ones(2, 5, dtype=torch.bool))),
        (prior, lambda net: net(torch.randn(2, 8), t, e, tok, torch.ones(2, 5, dtype=torch.bool))),
        (text, lambda net: net(torch.randn(2, 3, 8, 8), t, e, token_ids=ids)),
    ]
    for build, call in cases:
        (loss_a, grads_a), (loss_b, grads_b) = grads(build, call, False), grads(build, call, True)
        torch.testing.assert_close(loss_b, loss_a)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_channels_last_is_refused_where_the_optimizer_steps_other_tensors(tmp_path):
    """ZeRO's flat buffers, and half-precision weights under any master (the per-tensor one too: its
    fp32 copies keep the old layout, and a fused AdamW fed NHWC gradients for NCHW weights crashes on
    a GPU, or on a CPU (torch 2.14) updates each weight from another position's gradient)."""
    from train.speed import check_speed_settings

    tc = to_object(compose("decoder", ["trainer.channels_last=true"])).trainer
    check_speed_settings(tc, 0, True, "bf16")  # autocast over fp32 weights: fine
    check_speed_settings(tc, 0, False, "fp32")
    for zero, autocast, precision in ((1, True, "bf16"), (2, False, "fp32"), (0, False, "bf16"), (0, False, "fp16")):
        with pytest.raises(ValueError, match="channels_last=true needs the optimizer to step the model's own"):
            check_speed_settings(tc, zero, autocast, precision)


def test_learned_caption_padding_drops_the_mask_for_flash_attention():
    """caption_padding=learned: padded caption positions become a learned embedding, so attention
    needs no mask and SDPA's flash kernel takes it (the mask forbids flash); what the padded positions
    held no longer matters."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dec = _small(text_encoder="clip", unet_extra={"caption_padding": "learned"}).eval()
    inputs = _decoder_inputs("clip")
    masks, real = [], F.scaled_dot_product_attention
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention = lambda *a, **k: masks.append(k.get("attn_mask")) or real(*a, **k)
        try:
            out = dec(**inputs)
            junk = inputs | {"text_tokens": torch.where(inputs["text_mask"][..., None], inputs["text_tokens"], 7.0)}
            torch.testing.assert_close(dec(**junk), out)
        finally:
            F.scaled_dot_product_attention = real
    assert masks and all(m is None for m in masks)  # flash attention takes no mask on a GPU


def test_the_followed_embedding_map_moves_to_the_shape_and_survives_export():
    """`spatial_embed_follows`: the centred template lands where the heatmap points (a heatmap peaked at
    one cell puts the template's centre there), gradients reach the heatmap, and an exported decoder
    rebuilds with the option."""
    from unclip.decoder import decoder_from_config

    follows = {"input_patch": 2, "spatial_embed": True, "spatial_embed_follows": True}
    dec = _small(unet_extra=follows, text_encoder="none")
    net = dec.unet
    side = net.stem_side  # 8 cells of 2x2 pixels at 16 px
    template = torch.zeros(1, 1, side, side)
    template[0, 0, side // 2 - 1 : side // 2 + 1, side // 2 - 1 : side // 2 + 1] = 1  # centred 2x2 blob
    peak = torch.full((1, 1, side, side), -1e4)
    peak[0, 0, 1, 5] = 0  # row 1, column 5
    net.embed_place.forward = lambda h: peak
    placed = net._placed(template, torch.randn(1, 16, side, side))[0, 0]
    rows, cols = (placed > 0.2).nonzero().T.tolist()
    assert (min(rows), max(rows), min(cols), max(cols)) == (0, 2, 4, 6)  # around (1.5, 5.5): the blob's centre
    torch.testing.assert_close(placed.sum(), torch.tensor(4.0))  # moved whole, nothing lost

    dec = _small(unet_extra=follows, text_encoder="none")
    torch.nn.init.normal_(dec.unet.out[-1].weight, std=0.1)  # (zero-initialised: no gradient reaches back)
    out = dec.unet(torch.randn(2, 3, 16, 16), torch.tensor([5, 500]), image_embed=torch.randn(2, 8))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.unet.embed_place.parameters())
    rebuilt = decoder_from_config(dec.export_config())
    assert rebuilt.unet.embed_place is not None
    assert rebuilt.state_dict().keys() == dec.state_dict().keys()
    with pytest.raises(ValueError, match="set unet.spatial_embed=true"):
        _small(unet_extra={"spatial_embed_follows": True}, text_encoder="none")  # nothing to move: refused
