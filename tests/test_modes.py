"""The generation modes as the paper runs them and as a user can trust them: DDIM inversion behind
variations, interpolations and text diffs; edits that keep their pixels with the watermark on; CLIP's
centre crop; the prompt filter against the usual evasions in every mode; and the notes a call leaves
when it cannot do as asked."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import random_image
from tests.stack_helpers import tiny_decoder
from unclip.sample import main as sample_main

EVASIONS = ["nudes", "n u d e", "N.U.D.E", "nud3", "ｎｕｄｅ", "nudе", "nüde", "NaKeD", "n@ked"]  # the 6th: Cyrillic е


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def _scene(size: int = 16, seed: int = 0) -> Image.Image:
    return Image.fromarray(random_image(np.random.default_rng(seed), size))


# --- DDIM inversion ------------------------------------------------------------------------------------
def test_variations_start_from_the_inverted_latent(pipe):
    """Inverted and decoded with DDIM at eta 0, the image comes back far closer than from fresh noise
    (this tiny decoder's weights are random, so not exactly: the round trip itself is exact to the
    discretization in tests/test_diffusion.py, and measured on the demo's decoder by
    benchmarks/generation.py); eta > 0 varies it."""
    image, truth = _scene(), np.asarray(_scene())
    common = {"stop_at": 16, "decoder_steps": "ddim50", "decoder_guidance": 1.0}
    back = np.asarray(pipe.variations(image, 1, decoder_eta=0.0, **common).images[0])
    noise = {"start": "noise", "decoder_sampler": "ddim", "decoder_eta": 0.0}
    fresh = np.asarray(pipe.variations(image, 1, **noise, **common).images[0])
    varied = [np.asarray(im) for im in pipe.variations(image, 2, decoder_eta=1.0, **common).images]
    assert _psnr(back, truth) > _psnr(fresh, truth) + 5
    assert not np.array_equal(varied[0], back) and not np.array_equal(varied[0], varied[1])


def test_an_inverted_latent_decodes_back_under_guidance_a_prompt_and_a_negative_prompt(pipe):
    """The inversion runs the model function the decode will run (guidance, the variation's prompt, the
    negative prompt), so the round trip holds under each; inverted unguided and decoded at the stack's
    guidance, the moved demo's scenes came back up to 0.10 of the side away (docs/GENERATION.md)."""
    image, truth = _scene(), np.asarray(_scene())
    common = {"stop_at": 16, "decoder_steps": "ddim50", "decoder_eta": 0.0}
    unguided = _psnr(np.asarray(pipe.variations(image, 1, decoder_guidance=1.0, **common).images[0]), truth)
    for extra in ({}, {"prompt": "a red circle"}, {"prompt": "a red circle", "negative_prompt": "a blue star"}):
        back = np.asarray(pipe.variations(image, 1, decoder_guidance=4.0, **extra, **common).images[0])
        # this tiny decoder's weights are random, so its round trip is rough: 12.5 dB unguided, 10.6-11.8
        # here; inverted without the guidance or the prompt the decode reads, 7.0-8.0
        assert _psnr(back, truth) > unguided - 3, extra


def test_the_generation_benchmark_measures_inversion_and_resampling(pipe):
    """benchmarks/generation.py's figures on the tiny stack: the inverted latent gives the scene back
    closer than fresh noise, and RePaint's resampling changes the fill but not the scene it is scored
    against."""
    from benchmarks.generation import inpainting, inversion, scenes
    from data.synthetic import PRESETS
    from unclip.settings import SampleSettings

    samples = scenes("simple", 1, 16)
    ddim = {"decoder_sampler": "ddim", "decoder_eta": 0.0, "decoder_steps": "ddim50", "decoder_guidance": 1.0}
    s = SampleSettings(stop_at=16, **ddim)
    r = inversion(pipe, samples, s)
    assert r["inverted"] > r["fresh"] + 3 and r["worst"] <= r["inverted"]
    simple = PRESETS["simple"]
    off, on = inpainting(pipe, samples, s, 1, 10, simple), inpainting(pipe, samples, s, 10, 3, simple)
    assert off["real"] == on["real"] and off["seam"] != on["seam"]


def test_a_text_diffs_first_frame_is_the_reconstruction_and_interpolations_end_at_their_images(pipe):
    a, b = _scene(seed=1), _scene(seed=2)
    common = {"stop_at": 16, "decoder_steps": "ddim50", "decoder_guidance": 1.0}
    recon_a = np.asarray(pipe.variations(a, 1, decoder_eta=0.0, **common).images[0]).astype(int)
    recon_b = np.asarray(pipe.variations(b, 1, decoder_eta=0.0, **common).images[0]).astype(int)
    diff = pipe.text_diff(a, "a red circle", "a blue star", frames=3, max_angle=0.5, **common)
    # equal to float rounding (a batch of three frames, and a slerp at angle 0: tests/test_pipeline.py)
    assert np.abs(np.asarray(diff.images[0]).astype(int) - recon_a).max() <= 2
    frames = [np.asarray(f).astype(int) for f in pipe.interpolate(a, b, frames=3, **common).images]
    assert np.abs(frames[0] - recon_a).max() <= 2 and np.abs(frames[-1] - recon_b).max() <= 2
    assert np.abs(frames[1] - recon_a).max() > 8  # the middle is neither


def test_a_non_square_image_embeds_as_its_centre_crop(pipe):
    wide = np.asarray(_scene(48).resize((48, 24)))
    centre = wide[:, 12:36]
    torch.testing.assert_close(pipe.embed_image(Image.fromarray(wide)), pipe.embed_image(Image.fromarray(centre)))
    assert not torch.allclose(pipe.embed_image(Image.fromarray(wide), "pad"), pipe.embed_image(Image.fromarray(centre)))


def test_the_inpainting_decoder_has_the_known_region_pasted_back_at_every_step():
    decoder = tiny_decoder(inpaint=True).eval()
    known = torch.rand(1, 3, 16, 16) * 2 - 1
    keep = torch.zeros(1, 1, 16, 16)
    keep[..., :, :8] = 1
    seen = []
    decoder.sample(
        torch.randn(1, 16),
        torch.randn(1, 5, 32),
        torch.ones(1, 5, dtype=torch.bool),
        inpaint_image=known,
        inpaint_mask=keep,
        known=known,
        known_mask=keep,
        steps="6",
        generator=torch.Generator().manual_seed(0),
        on_step=lambda i, x: seen.append((i, x.clone())) or x,
    )
    final_i, final = seen[-1]
    assert final_i == 0 and torch.equal(final[..., :8], known[..., :8])  # x_0's known half is the input
    noisy = [x[..., :8] for i, x in seen[:-1]]
    assert all(not torch.equal(x, known[..., :8]) for x in noisy)  # before: the input noised to each level


# --- what a user can trust ------------------------------------------------------------------------------
def test_an_inpainting_keeps_every_kept_pixel_with_the_watermark_on(stack, tmp_path):
    pytest.importorskip("imwatermark", reason="the watermark extra (pip install unclip[watermark])")
    image = tmp_path / "scene.png"
    _scene(256, seed=3).save(image)
    flags = ["--prior", str(stack["prior"]), "--decoder", str(stack["decoder"]), "--up256", str(stack["up256"])]
    flags += ["--up1024", str(stack["up1024"]), "--no-progress", "--out", str(tmp_path / "out")]
    assert sample_main(["inpaint", str(image), "--box", "64,64,192,192", *flags]) == 0  # the watermark: on
    (made,) = (tmp_path / "out").glob("inpaint-scene-*/00.png")
    out, truth = np.asarray(Image.open(made).convert("RGB")), np.asarray(Image.open(image))
    keep = np.ones((256, 256), bool)
    keep[64:192, 64:192] = False
    assert np.array_equal(out[keep], truth[keep])


@pytest.mark.parametrize("evasion", EVASIONS)
def test_every_evasion_is_refused_in_every_mode(pipe, stack, tmp_path, capsys, evasion):
    prompt = f"a {evasion} figure"
    image = _scene()
    assert pipe.text_to_image([prompt], 1).refused and not pipe.text_to_image([prompt], 1).images
    for call in (
        lambda: pipe.variations(image, 1, prompt=prompt),
        lambda: pipe.inpaint(image, torch.zeros(16, 16), prompt=prompt),
        lambda: pipe.outpaint(image, (8, 0, 0, 0), prompt=prompt),
        lambda: pipe.text_diff(image, "a red circle", prompt),
    ):
        with pytest.raises(ValueError, match="refused"):
            call()
    png = tmp_path / "scene.png"
    image.save(png)
    flags = ["--decoder", str(stack["decoder"]), "--prior", str(stack["prior"]), "--out", str(tmp_path / "o")]
    assert sample_main(["variations", str(png), "--prompt", prompt, *flags]) == 1
    assert "refused" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ordinary_prompts_pass_the_filter(pipe):
    for prompt in ("a red circle on a blue background", "a nudibranch", "class photo", "a star above a square"):
        assert pipe.prompt_filter.check(prompt) is None, prompt


def test_a_negative_prompt_nothing_reads_and_a_prompt_past_the_context_are_said(pipe):
    out = pipe.text_to_image(["a red circle"], 1, negative_prompt="blue", prior_guidance=1.0, decoder_guidance=1.0)
    assert any("the negative prompt changes nothing here" in n for n in out.notes)
    long = "a big red circle above a small blue square on a white background with a yellow star"
    out = pipe.text_to_image([long], 1)
    assert any(f"longer than the CLIP's {pipe.clip.context_length} tokens: only 'a big red" in n for n in out.notes)
    assert not pipe.text_to_image(["a red circle"], 1).notes


def test_the_server_refuses_an_evasion_too(stack):
    pytest.importorskip("fastapi", reason="the serve extra")
    import httpx

    from tests.serve_helpers import running, stack_app

    with running(stack_app(stack)) as url:
        for evasion in ("n u d e", "nud3"):
            done = httpx.post(f"{url}/v1/images/generations", json={"prompt": f"a {evasion}", "size": "16x16"})
            assert done.status_code == 400 and done.json()["error"]["code"] == "content_policy_violation"
        buffer = io.BytesIO()
        _scene().save(buffer, format="PNG")
        done = httpx.post(
            f"{url}/v1/images/variations", files={"image": ("s.png", buffer.getvalue())}, data={"prompt": "n.u.d.e"}
        )
        assert done.status_code == 400 and done.json()["error"]["code"] == "content_policy_violation"
