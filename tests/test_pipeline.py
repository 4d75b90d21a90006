"""The generation pipeline on a tiny random stack: every mode end to end, seeds, the exact paste of
edits, and the load-time checks (missing, wrong-kind and foreign-CLIP exports, resolutions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.stack_helpers import write_stack
from unclip.pipeline import Pipeline, SampleSettings, stage_generators
from unclip.provenance import file_sha256


def _arrays(gen) -> list[np.ndarray]:
    return [np.asarray(im) for im in gen.images]


def test_text_to_image_through_every_stage(pipe, stack):
    out = pipe.text_to_image(["a red circle", "a blue star"], num_images=2, seed=7, batch_size=3)
    assert [im.size for im in out.images] == [(256, 256)] * 4
    assert out.seeds == [7, 8, 7, 8]
    assert [r["prompt"] for r in out.records] == ["a red circle"] * 2 + ["a blue star"] * 2
    stages = out.settings["stages"]
    assert stages["prior"] == {"steps": "3", "guidance": 1.0, "candidates": 2}  # the export's own
    assert stages["decoder"]["steps"] == "4" and stages["decoder"]["guidance"] == 3.0
    assert out.settings["exports"]["decoder"]["sha256"] == file_sha256(stack["decoder"] / "model.safetensors")
    assert pipe.text_to_image(["a red circle"], 1, stop_at=64).images[0].size == (64, 64)
    assert pipe.text_to_image(["a red circle"], 1, stop_at=16).images[0].size == (16, 16)
    with pytest.raises(ValueError, match="stop_at=128"):
        pipe.text_to_image(["a red circle"], 1, stop_at=128)
    with pytest.raises(TypeError, match="unknown sampling settings"):
        pipe.text_to_image(["a red circle"], 1, guidance=2)


def test_a_seed_fixes_every_image_and_another_seed_changes_it(pipe):
    kw = {"stop_at": 64, "batch_size": 1}
    a = _arrays(pipe.text_to_image(["a red circle"], 2, seed=3, **kw))
    b = _arrays(pipe.text_to_image(["a red circle"], 2, seed=3, **kw))
    alone = _arrays(pipe.text_to_image(["a red circle"], 1, seed=4, **kw))  # image 1 of seed 3 is seed 4
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(a[1], alone[0])
    assert not np.array_equal(a[0], a[1])
    # the batch an image is drawn in changes float rounding at most, not the image
    batched = _arrays(pipe.text_to_image(["a blue star", "a red circle"], 2, seed=3, stop_at=64, batch_size=4))
    assert np.abs(batched[2].astype(int) - a[0]).max() <= 2


def test_stage_generators_are_per_seed_and_per_stage():
    a = stage_generators([1, 2], "decoder")
    b = stage_generators([2], "decoder")
    c = stage_generators([2], "up256")
    assert torch.equal(torch.randn(3, generator=a[1]), torch.randn(3, generator=b[0]))
    assert not torch.equal(
        torch.randn(3, generator=stage_generators([2], "decoder")[0]), torch.randn(3, generator=c[0])
    )


def test_reranking_keeps_the_best_candidates_by_clip_score(pipe):
    out = pipe.text_to_image(["a red circle"], num_images=2, rerank=5, stop_at=16)
    every = pipe.text_to_image(["a red circle"], num_images=5, stop_at=16)
    scores = [r["clip_score"] for r in every.records]
    best = sorted(range(5), key=lambda k: -scores[k])[:2]
    assert out.seeds == [every.seeds[k] for k in best]
    assert [r["clip_score"] for r in out.records] == sorted(scores, reverse=True)[:2]


def test_refused_prompts_are_skipped_and_listed(pipe):
    out = pipe.text_to_image(["a red circle", "a nude figure"], num_images=1, stop_at=16)
    assert [r["prompt"] for r in out.records] == ["a red circle"]
    assert out.refused[0][0] == "a nude figure" and "nude" in out.refused[0][1]


def test_variations_interpolation_and_text_diff(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    var = pipe.variations(image, num_images=3, stop_at=64)
    assert [im.size for im in var.images] == [(64, 64)] * 3 and var.seeds == [0, 1, 2]
    assert len({im.tobytes() for im in var.images}) == 3
    other = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    frames = pipe.interpolate(image, other, frames=4, stop_at=16)
    assert [r["t"] for r in frames.records] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert frames.settings["stages"]["decoder"]["sampler"] == "ddim"  # fixed noise, deterministic steps
    assert len({im.tobytes() for im in frames.images}) == 4  # only the embedding moves, and it moves them
    diff = pipe.text_diff(image, "a red circle", "a blue circle", frames=3, stop_at=16)
    assert [r["theta"] for r in diff.records] == pytest.approx([0, 0.25, 0.5])


@pytest.mark.parametrize("inpaint_decoder", [False, True])
def test_inpainting_keeps_every_pixel_outside_the_mask(tmp_path, inpaint_decoder, stack):
    if inpaint_decoder:
        stack = write_stack(tmp_path / "inpaint", inpaint=True)
    pipe = Pipeline.from_exports(decoder=stack["decoder"], prior=stack["prior"], up256=stack["up256"], progress=False)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # not square, not 64
    mask = np.zeros((48, 80), np.uint8)
    mask[10:30, 20:60] = 255  # white = paint
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for prompt, jumps in ((None, 1), ("a red circle", 2)):
        out = pipe.inpaint(image, tmp_path / "mask.png", prompt=prompt, num_images=2, jump_n_sample=jumps)
        keep = mask == 0
        for result in _arrays(out):
            assert result.shape == (48, 80, 3)
            assert np.array_equal(result[keep], np.asarray(image)[keep])
            assert (result[~keep] != np.asarray(image)[~keep]).mean() > 0.5


def test_outpainting_grows_the_canvas_and_keeps_the_original(pipe):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = pipe.outpaint(image, extend={"left": 32, "right": 16}, num_images=2, stop_at=64)
    assert [im.size for im in out.images] == [(112, 64)] * 2
    assert out.settings["tiles"] == 2
    for result in _arrays(out):
        assert np.array_equal(result[:, 32:96], np.asarray(image))
    # at the 16px stage the original is one 16px tile; 4:1 needs 24px more on each side, half a tile at a time
    wide = pipe.outpaint(image, aspect="4:1", stop_at=16)
    assert wide.images[0].size == (256, 64) and wide.settings["tiles"] == 6
    assert np.array_equal(np.asarray(wide.images[0])[:, 96:160], np.asarray(image))


def test_bf16_autocast_runs_on_the_cpu(stack):
    pipe = Pipeline.from_exports(decoder=stack["decoder"], prior=stack["prior"], precision="bf16", progress=False)
    out = pipe.text_to_image(["a red circle"], 2)
    assert out.settings["precision"] == "bf16" and out.images[0].size == (16, 16)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="seed"):
        SampleSettings(seed=-1).validate()
    with pytest.raises(ValueError, match="decoder_sampler"):
        SampleSettings(decoder_sampler="euler").validate()


# --- load-time checks ------------------------------------------------------------------------------
def test_a_missing_or_wrong_kind_export_names_the_argument(stack, tmp_path):
    with pytest.raises(FileNotFoundError, match="prior=.*not an export folder"):
        Pipeline.from_exports(decoder=stack["decoder"], prior=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="prior=.*holds a 'decoder' export, not a 'prior' one"):
        Pipeline.from_exports(decoder=stack["decoder"], prior=stack["decoder"])
    with pytest.raises(ValueError, match="up256 upsamples 64px images to 256px, but decoder makes 16px"):
        Pipeline.from_exports(decoder=stack["decoder"], up256=stack["up1024"])
    with pytest.raises(ValueError, match="load up256 too"):
        Pipeline.from_exports(decoder=stack["decoder"], up1024=stack["up1024"])
    with pytest.raises(ValueError, match="needs a prior"):
        Pipeline.from_exports(decoder=stack["decoder"], progress=False).text_to_image(["a red circle"])


def test_a_stage_trained_with_another_clip_is_refused(stack, tmp_path):
    other = write_stack(tmp_path / "other", clip_seed=1)
    with pytest.raises(ValueError, match=r"prior=.*trained with CLIP \w+, but the CLIP in use .* is CLIP \w+"):
        Pipeline.from_exports(decoder=stack["decoder"], prior=other["prior"])
    with pytest.raises(ValueError, match=r"decoder=.*trained with CLIP.*clip="):
        Pipeline.from_exports(decoder=stack["decoder"], clip=other["clip"])


def test_a_negative_prompt_replaces_the_empty_caption_in_the_unconditional_pass(pipe):
    decoder, clip = pipe.decoder, pipe.clip
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 1])
    embed = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    caption = decoder.caption_inputs(["a red circle", "a blue star"], clip)
    negative = decoder.caption_inputs(["a green square"] * 2, clip)
    guided = decoder.guided_fn(embed, caption, 3.0, negative=negative)(x, t)
    cond = decoder(x, t, embed, **caption).float()
    uncond = decoder(x, t, embed, drop_image=torch.ones(2, dtype=torch.bool), **negative).float()
    assert torch.allclose(guided, decoder.diffusion.guide(cond, uncond, 3.0), atol=1e-5)
    # the prior: a negative equal to the prompt cancels the guidance, whatever its scale
    text = clip.encode_captions(["a red circle"])
    both = (text.embedding, text.tokens, text.mask)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    unguided = pipe.prior.sample(*both, guidance_scale=1.0, generator=gen())
    cancelled = pipe.prior.sample(*both, guidance_scale=4.0, negative=both, generator=gen())
    guided_prior = pipe.prior.sample(*both, guidance_scale=4.0, generator=gen())
    assert torch.allclose(unguided, cancelled, atol=1e-4)
    assert not torch.allclose(unguided, guided_prior, atol=1e-2)


def test_a_negative_prompt_changes_the_images_and_is_recorded(pipe):
    kw = {"stop_at": 16, "seed": 2, "decoder_guidance": 3.0, "prior_guidance": 2.0}
    plain = pipe.text_to_image(["a red circle"], 1, **kw)
    steered = pipe.text_to_image(["a red circle"], 1, negative_prompt="a blue circle", **kw)
    assert plain.images[0].tobytes() != steered.images[0].tobytes()
    assert steered.settings["negative_prompt"] == "a blue circle" and plain.settings["negative_prompt"] is None


def test_damaged_exports_are_clear_errors(stack, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from data.embed import main as embed_main

    copies = {name: shutil.copytree(stack[name], tmp_path / name) for name in ("prior", "decoder", "clip")}
    for name in ("prior", "decoder"):  # a copy cut short
        weights = copies[name] / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"prior/model.safetensors \(1000 bytes\) is not a readable safetensors"):
        Pipeline.from_exports(decoder=stack["decoder"], prior=copies["prior"])
    with pytest.raises(ValueError, match=r"decoder/model.safetensors \(1000 bytes\) is not a readable"):
        Pipeline.from_exports(decoder=copies["decoder"], clip=stack["clip"])
    # a CLIP export with a tensor of another shape, then with one the architecture lacks
    clip_weights = copies["clip"] / "model.safetensors"
    tensors = load_file(str(clip_weights))
    key = next(k for k in tensors if k.endswith("proj") or k.endswith("projection"))
    save_file(tensors | {key: torch.zeros(3, 3)}, str(clip_weights))
    with pytest.raises(ValueError, match=r"does not load into model.clip.arch=custom.*size mismatch"):
        Pipeline.from_exports(decoder=stack["decoder"], clip=copies["clip"])
    save_file(tensors | {"extra.weight": torch.zeros(2)}, str(clip_weights))
    with pytest.raises(ValueError, match=r"does not load into model.clip.arch=custom.*extra.weight"):
        Pipeline.from_exports(decoder=stack["decoder"], clip=copies["clip"])
    clip_weights.write_bytes(clip_weights.read_bytes()[:500])
    with pytest.raises(SystemExit, match="error: CLIP checkpoint .* does not load"):
        embed_main(["--shards", str(tmp_path), "--clip", str(copies["clip"]), "--out", str(tmp_path / "emb")])
