"""Bad input gets one clear line and costs nothing: sizes checked before decoding, every numeric
setting finite and in range, damaged files named. (Checkpoints: test_trainer.py; exports:
test_untrusted_exports.py.)"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import SkipSample, decode_image
from tests.helpers import garbled_scan, image_bytes, png_header, random_image, write_tar
from unclip.sample import main as sample_main

ROOT = Path(__file__).resolve().parent.parent


def _flags(stack) -> list[str]:
    return ["--prior", str(stack["prior"]), "--decoder", str(stack["decoder"]), "--no-progress"]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- sizes before decoding ----------------------------------------------------------------------------
def test_a_long_thin_png_is_too_large_once_resized_and_costs_nothing():
    """100000x1 passes a pixel limit; brought to a 128 px shorter side it would be 12.8M x 128."""
    data = image_bytes(np.zeros((1, 100_000, 3), np.uint8))
    assert len(data) < 2_000
    assert decode_image(data).size == (100_000, 1)  # alone it is small
    with pytest.raises(SkipSample, match="too_large: 100000x1 resized to a 128 px side would be 12800000x128"):
        decode_image(data, min_side=128)
    with pytest.raises(SkipSample, match="too_large"):
        decode_image(png_header(100_000, 1), min_side=128)  # from the header: nothing is decoded


def test_data_shards_resize_checks_the_resized_size_first(tmp_path):
    from data.shards import pairs_from_folder, write_shards

    src = tmp_path / "src"
    src.mkdir()
    (src / "thin.png").write_bytes(png_header(100_000, 1))
    (src / "thin.txt").write_text("a line")
    Image.fromarray(random_image(np.random.default_rng(0), 40)).save(src / "ok.png")
    (src / "ok.txt").write_text("a picture")
    summary = write_shards(pairs_from_folder(src), tmp_path / "out", resize=128, progress=False)
    assert summary["written"] == 1 and summary["skipped"] == {"too_large": 1}


def test_a_garbled_cmyk_jpeg_is_caught_like_an_rgb_one():
    cmyk = Image.fromarray(random_image(np.random.default_rng(3), 64)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=90)
    assert decode_image(buf.getvalue()).mode == "RGB"  # a clean CMYK JPEG decodes
    with pytest.raises(SkipSample, match="corrupt_image: CMYK JPEG: Corrupt JPEG data"):
        decode_image(garbled_scan(buf.getvalue()))


def test_a_file_that_is_not_a_tar_is_counted_as_such(tmp_path):
    from data.loader import DataConfig, ShardLoader

    (tmp_path / "00000.tar").write_bytes(b"this is not a tar file at all" * 40)
    write_tar(tmp_path / "00001.tar", [("a.png", image_bytes(random_image(np.random.default_rng(0)))), ("a.txt", b"x")])
    cfg = DataConfig(shards=str(tmp_path), resolution=32, crop="center", resampled=False, num_workers=0)
    loader = ShardLoader(cfg, batch_size=1, repeat=False)
    with pytest.warns(UserWarning, match="is not a tar file"):
        assert [b["caption"] for b in loader] == [["x"]]
    assert loader.skipped == {"not_a_tar": 1}


@pytest.mark.parametrize("side", [12_000, 20_000, 50_000])
@pytest.mark.parametrize("mode", ["variations", "inpaint", "inpaint-mask", "outpaint"])
def test_huge_images_into_every_mode_are_one_line(stack, tmp_path, capsys, mode, side):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(side, side))  # 12000^2 would peak at 5.9 GB if decoded
    small = tmp_path / "small.png"
    Image.fromarray(random_image(np.random.default_rng(0), 16)).save(small)
    args = {
        "variations": ["variations", str(huge)],
        "inpaint": ["inpaint", str(huge), "--box", "0,0,8,8"],
        "inpaint-mask": ["inpaint", str(small), "--mask", str(huge)],
        "outpaint": ["outpaint", str(huge), "--extend", "8,8,0,0"],
    }[mode]
    assert sample_main([*args, "--out", str(tmp_path / "o"), *_flags(stack)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(huge) in line and (f"{side}x{side}" in line or "too large to decode" in line), line


def test_one_checked_decode_serves_the_pipeline_and_the_server():
    """unclip.images.open_checked: a header over the limit is ImageTooLarge before any other check or
    decode (the server answers it 413), a file that is no image a plain ValueError (400)."""
    from unclip.images import ImageTooLarge, open_checked

    seen = []
    with pytest.raises(ImageTooLarge, match="12000x12000"):
        open_checked(io.BytesIO(png_header(12000, 12000)), "upload", check_header=seen.append)
    assert seen == []
    with pytest.raises(ValueError, match="upload is not a readable image") as e:
        open_checked(io.BytesIO(b"not an image"), "upload")
    assert not isinstance(e.value, ImageTooLarge)
    small = io.BytesIO()
    Image.fromarray(random_image(np.random.default_rng(0), 16)).save(small, format="PNG")
    small.seek(0)
    assert open_checked(small, "upload", check_header=seen.append).size == (16, 16) and len(seen) == 1


def test_a_mask_of_another_size_is_refused(stack, tmp_path, capsys):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray(random_image(np.random.default_rng(0), 16)).save(image)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    assert sample_main(["inpaint", str(image), "--mask", str(mask), "--out", str(tmp_path / "o"), *_flags(stack)]) == 1
    assert "the mask is 8x8 but the image is 16x16" in _one_line(capsys.readouterr().err)


# --- settings: finite and in range, named as the caller calls them -------------------------------------
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--decoder-guidance", "nan"], "--decoder-guidance must be a finite number, got nan"),
        (["--prior-guidance", "nan"], "--prior-guidance must be a finite number, got nan"),
        (["--decoder-guidance", "-1"], "--decoder-guidance must be >= 0"),
        (["--decoder-eta", "inf"], "--decoder-eta must be a finite number"),
        (["--decoder-steps", "abc"], "--decoder-steps='abc' is not a step count"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_settings_on_the_command_line_name_the_flag(stack, tmp_path, capsys, flags, message):
    assert sample_main(["text", "a red circle", *flags, "--out", str(tmp_path / "o"), *_flags(stack)]) == 1
    assert message in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "argv,message",
    [
        (["text", "x", "--num-images", "0"], "argument --num-images: must be at least 1, got 0"),
        (["text", "x", "--num-images", "-2"], "argument --num-images: must be at least 1, got -2"),
        (["interpolate", "a.png", "b.png", "--frames", "0"], "argument --frames: must be at least 2, got 0"),
        (["text", "x", "--decoder-guidance", "abc"], "argument --decoder-guidance: 'abc' is not a number"),
        (["outpaint", "a.png", "--extend", "1,1,1,1", "--overlap", "1"], "argument --overlap: must be in [0, 1)"),
    ],
)
def test_bad_counts_are_one_line_from_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        sample_main(argv)
    assert exit_.value.code == 2 and message in _one_line(capsys.readouterr().err)


def test_the_python_api_checks_settings_too(stack):
    from unclip.pipeline import Pipeline

    pipe = Pipeline.from_exports(prior=stack["prior"], decoder=stack["decoder"], progress=False)
    with pytest.raises(ValueError, match="decoder_guidance must be a finite number, got nan"):
        pipe.text_to_image("a red circle", num_images=1, decoder_guidance=float("nan"))
    with pytest.raises(ValueError, match="num_images .* must be at least 1"):
        pipe.variations(torch.zeros(3, 16, 16), num_images=0)


def test_a_prompt_file_that_is_not_utf8_and_an_inspected_non_image(stack, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    assert sample_main(["text", "--prompts", str(prompts), *_flags(stack)]) == 1
    assert f"--prompts={prompts} is not UTF-8 text" in _one_line(capsys.readouterr().err)
    (tmp_path / "notes.png").write_text("not an image")
    assert sample_main(["inspect", str(tmp_path / "notes.png")]) == 1
    assert f"{tmp_path / 'notes.png'} is not a readable image" in _one_line(capsys.readouterr().err)


# --- eval ---------------------------------------------------------------------------------------------
def test_eval_refuses_nan_guidance_and_zero_count_and_leaves_no_outputs_folder(stack, tmp_path):
    """In a subprocess, as a user runs it: Hydra must not write outputs/ into the working directory."""
    runs = stack["clip"].parent.parent
    base = [sys.executable, "-m", "eval", "name=x", f"evals_dir={tmp_path / 'evals'}", f"model.stack={runs}"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    for extra, message in (
        (["data.count=0"], "data.count must be at least 1 (captions to score), got 0"),
        (["pipeline.decoder_guidance=nan"], "pipeline.decoder_guidance must be a finite number, got nan"),
        (["eval.guidance=[1,nan]"], "eval.guidance values must be finite numbers >= 0, got nan"),
    ):
        done = subprocess.run([*base, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and message in _one_line(done.stderr), done.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_eval_skips_and_counts_a_garbled_heldout_jpeg(tmp_path):
    from eval.config import EvalData
    from eval.data import load_heldout

    rng = np.random.default_rng(0)
    members = []
    for i in range(3):
        jpeg = image_bytes(random_image(rng, 32), "JPEG", quality=90)
        members += [(f"{i:03d}.jpg", garbled_scan(jpeg) if i == 1 else jpeg), (f"{i:03d}.txt", f"scene {i}".encode())]
    write_tar(tmp_path / "00000.tar", members)
    heldout = load_heldout(EvalData(shards=str(tmp_path), count=3))
    got = [i for i, _ in heldout.real_images([0, 1, 2], 32)]
    assert got == [0, 2] and heldout.skipped["corrupt_image"] == 1


def test_eval_inputs_that_are_not_what_they_claim(tmp_path):
    from eval.features import Inception, InceptionConfig
    from eval.generate import external_images
    from tests.test_untrusted_exports import plant

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world junk")
    with pytest.raises(ValueError, match=f"{junk} .* is not a readable torch Inception weights file"):
        Inception(InceptionConfig(weights=str(junk)))
    (tmp_path / "w").mkdir()
    payload, marker = plant(tmp_path / "w")  # a pickle that would run code
    with pytest.raises(ValueError, match=f"{payload}: refused to load the Inception weights: it holds posix.system"):
        Inception(InceptionConfig(weights=str(payload)))
    assert not marker.exists()
    generated = tmp_path / "gen"
    generated.mkdir()
    (generated / "000000_0.png").write_text("not an image")
    (generated / "000000_0.txt").write_text("a caption")
    images, _ = external_images(generated, 0, 1, 32)
    with pytest.raises(ValueError, match="model.generated: .*000000_0.png is not a readable image"):
        list(images)


def test_an_object_array_in_an_embedding_folder_is_named(tmp_path):
    from data.embeddings import EmbeddingStore, write_part

    write_part(tmp_path, "00000", ["a", "b"], ["x", "y"], np.zeros((2, 4), np.float16), np.zeros((2, 4), np.float16))
    bad = tmp_path / "img_emb" / "img_emb_00000.npy"
    np.save(bad, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"{bad} is not a numeric embedding array"):
        _ = EmbeddingStore(tmp_path).embed_dim
