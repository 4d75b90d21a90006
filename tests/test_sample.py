"""python -m unclip.sample on a tiny random stack: files, resume, refusals before any model loads,
provenance through `inspect`, stack discovery, every edit mode, and 2 ranks under torchrun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.stack_helpers import write_stack
from tests.trainer_helpers import run_module
from unclip.provenance import file_sha256, read_provenance, save_png
from unclip.sample import find_stack, main, short_hash

ROOT = Path(__file__).resolve().parent.parent


def _flags(stack, *names) -> list[str]:
    out = []
    for name in names or ("prior", "decoder", "up256"):
        out += [f"--{name}", str(stack[name])]
    return out + ["--no-progress"]


def test_text_writes_images_sheets_and_resumes(stack, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["text", "a red circle", "a blue star", "--num-images", "2", "--out", str(out), *_flags(stack)]
    assert main(args) == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [
        f"00000-a-red-circle-{short_hash('a red circle')}",
        f"00001-a-blue-star-{short_hash('a blue star')}",
    ]
    for folder in folders:
        files = sorted(p.name for p in (out / folder).iterdir())
        assert files == ["00.png", "01.png", "prompt.txt", "sheet.png"]
        assert Image.open(out / folder / "00.png").size == (64, 64)
    assert "wrote 4 images" in capsys.readouterr().out
    before = (out / folders[0] / "00.png").stat().st_mtime_ns
    assert main(args) == 0  # a rerun resumes: nothing left to do
    assert "wrote 0 images" in capsys.readouterr().out and (out / folders[0] / "00.png").stat().st_mtime_ns == before
    (out / folders[1] / "01.png").unlink()  # an interrupted run: only what is missing is written
    assert main(args) == 0 and "wrote 1 images" in capsys.readouterr().out
    assert main([*args, "--decoder-guidance", "1.5"]) == 1  # other settings never mix into the folder
    assert "other settings (stages.decoder.guidance: 3.0 -> 1.5)" in capsys.readouterr().err


def test_provenance_round_trips_through_inspect(stack, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["text", "a red circle", "--num-images", "1", "--seed", "5", "--out", str(out), *_flags(stack)]) == 0
    path = out / f"00000-a-red-circle-{short_hash('a red circle')}" / "00.png"
    info = read_provenance(path)
    assert info["parameters"].startswith("a red circle\nSteps: 4, Sampler: ddpm, CFG scale: 3.0, Seed: 5, Size: 64x64")
    record = info["record"]
    assert record["prompt"] == "a red circle" and record["seed"] == 5 and record["mode"] == "text"
    assert record["exports"]["decoder"]["sha256"] == file_sha256(stack["decoder"] / "model.safetensors")
    assert record["stages"]["up256"]["steps"] == "ddim3" and record["program"] == "unclip"
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "Seed: 5" in shown and '"prompt": "a red circle"' in shown and "watermark: none possible" in shown
    assert main(["inspect", str(tmp_path / "missing.png")]) == 1


def test_the_watermark_is_embedded_and_read_back(tmp_path):
    from data.scenes import make_sample
    from data.synthetic import PRESETS

    pytest.importorskip("imwatermark", reason="the watermark extra (pip install unclip[watermark])")
    scene, _ = make_sample(0, "heldout", 0, 256, PRESETS["simple"])
    marks = save_png(scene, tmp_path / "a.png", {"prompt": "x"}, signature=True)
    assert marks == {"watermark": "dwtDctSvd", "signature": True}
    assert read_provenance(tmp_path / "a.png")["watermark"] == "present"
    scene.save(tmp_path / "plain.png")
    assert read_provenance(tmp_path / "plain.png")["watermark"] == "absent"
    signed = np.asarray(Image.open(tmp_path / "a.png"))
    assert signed[-1, -1].tolist() == [60, 70, 255]  # the signature's last square is blue


def test_the_prompt_filter_refuses_before_any_model_loads(tmp_path, capsys):
    args = ["text", "gore on a white background", "--decoder", str(tmp_path / "no-such-export"), "--out", str(tmp_path)]
    assert main(args) == 1  # refused, and the missing export was never opened
    err = capsys.readouterr().err
    assert "refused: 'gore on a white background' (blocklist" in err and "no-such-export" not in err
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# mine\nre:\\bcircle\\b\n")
    assert main(["text", "a red circle", "--blocklist", str(blocklist), "--decoder", "nowhere"]) == 1
    assert "re:\\bcircle\\b" in capsys.readouterr().err


def test_refusals_do_not_stop_the_rest(stack, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na naked star\na blue star\n")
    assert main(["text", "--prompts", str(prompts), "--num-images", "1", "--out", str(out), *_flags(stack)]) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == [
        f"00000-a-red-circle-{short_hash('a red circle')}",
        f"00002-a-blue-star-{short_hash('a blue star')}",
    ]
    assert "refused: 'a naked star'" in capsys.readouterr().err


def test_a_prompt_classifier_plugs_in(stack, tmp_path, capsys, monkeypatch):
    module = tmp_path / "my_moderation.py"
    module.write_text("def no_stars(prompt):\n    return 'stars are not allowed' if 'star' in prompt else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["text", "a blue star", "--prompt-classifier", "my_moderation:no_stars", "--decoder", "nowhere"]
    assert main(args) == 1
    assert "classifier no_stars: stars are not allowed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "mode,extra,count,size",
    [
        ("variations", ["--num-images", "2"], 2, (64, 64)),
        ("interpolate", ["IMAGE", "--frames", "3"], 3, (64, 64)),
        ("text-diff", ["--from", "a red circle", "--to", "a blue circle", "--frames", "2"], 2, (64, 64)),
        ("inpaint", ["--box", "8,8,40,40", "--prompt", "a red circle"], 1, (48, 48)),
        ("outpaint", ["--extend", "16,16,0,0"], 1, (80, 48)),
    ],
)
def test_every_edit_mode_from_the_command_line(stack, tmp_path, mode, extra, count, size):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    extra = [str(image) if e == "IMAGE" else e for e in extra]
    assert main([mode, str(image), *extra, "--out", str(tmp_path / "out"), *_flags(stack)]) == 0
    (folder,) = (tmp_path / "out").iterdir()
    assert folder.name.startswith(mode)
    images = sorted(folder.glob("[0-9]*.png"))
    assert len(images) == count and Image.open(images[0]).size == size
    assert read_provenance(images[0])["record"]["mode"] == mode.replace("-", "_")
    assert (folder / "sheet.png").is_file() and (folder / "settings.json").is_file()


def test_stack_discovery_by_runs_folder_and_prefix(tmp_path):
    stack = write_stack(tmp_path / "build")
    runs = tmp_path / "runs"
    for name, kind in (
        ("demo-prior", "prior"),
        ("demo-decoder", "decoder"),
        ("demo-up", "up256"),
        ("big-up", "up1024"),
    ):
        (runs / name).mkdir(parents=True)
        os.symlink(stack[kind], runs / name / "export")
    found = find_stack(str(runs))
    assert found == {
        k: str(runs / n / "export")
        for k, n in (("prior", "demo-prior"), ("decoder", "demo-decoder"), ("up256", "demo-up"), ("up1024", "big-up"))
    }
    assert set(find_stack(str(runs / "demo"))) == {"prior", "decoder", "up256"}  # the prefix leaves big-up out
    (runs / "demo2-decoder").mkdir()  # another stack whose name starts with this one's: not part of it
    os.symlink(stack["decoder"], runs / "demo2-decoder" / "export")
    assert find_stack(str(runs / "demo"))["decoder"] == str(runs / "demo-decoder" / "export")
    (runs / "demo-decoder2").mkdir()
    os.symlink(stack["decoder"], runs / "demo-decoder2" / "export")
    with pytest.raises(ValueError, match="several decoder exports"):
        find_stack(str(runs / "demo"))
    with pytest.raises(ValueError, match="no decoder export"):
        find_stack(str(runs / "nothing"))


@pytest.mark.multiproc
def test_two_ranks_under_torchrun_write_every_prompt_once(stack, tmp_path):
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "star")] + ["a nude circle"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    args = ["text", "--prompts", str(tmp_path / "prompts.txt"), "--num-images", "2", "--out", str(out)]
    done = run_module("unclip.sample", [*args, "--stop-at", "16", *_flags(stack)], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    made = sorted(out.glob("*/[0-9]*.png"))
    assert len(made) == 12  # 6 allowed prompts x 2 images, the refused one made by nobody
    by_prompt = {}
    for path in made:
        record = read_provenance(path)["record"]
        by_prompt.setdefault(record["prompt"], []).append(record["seed"])
    assert by_prompt == {p: [0, 1] for p in prompts[:-1]}
    assert "rank 0: wrote 6 images" in done.stdout and "rank 1: wrote 6 images" in done.stdout
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mode"] == "text" and settings["num_images"] == 2


def test_a_negative_prompt_is_in_the_parameters_chunk(stack, tmp_path):
    out = tmp_path / "out"
    flags = ["--num-images", "1", "--negative-prompt", "a blue star", "--out", str(out)]
    assert main(["text", "a red circle", *flags, *_flags(stack)]) == 0
    info = read_provenance(out / f"00000-a-red-circle-{short_hash('a red circle')}" / "00.png")
    assert info["parameters"].startswith("a red circle\nNegative prompt: a blue star\nSteps: 4")
    assert info["record"]["negative_prompt"] == "a blue star"


def test_prompts_that_differ_only_in_case_or_punctuation_get_their_own_folders(stack, tmp_path, capsys):
    """Run one writes "a red circle"; run two asks for "A red circle!" in the same folder: it is made,
    not skipped as already there."""
    out = tmp_path / "out"
    for prompt in ("a red circle", "A red circle!"):
        assert main(["text", prompt, "--num-images", "1", "--out", str(out), *_flags(stack)]) == 0
        assert "wrote 1 images" in capsys.readouterr().out
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and {(f / "prompt.txt").read_text().strip() for f in folders} == {
        "a red circle",
        "A red circle!",
    }
    # two inputs of one name in two folders: two folders, not one skipped
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((16, 16, 3), 40 if sub == "a" else 200, np.uint8)).save(tmp_path / sub / "scene.png")
        assert (
            main(
                [
                    "variations",
                    str(tmp_path / sub / "scene.png"),
                    "--num-images",
                    "1",
                    "--out",
                    str(out),
                    *_flags(stack),
                ]
            )
            == 0
        )
    assert len([p for p in out.iterdir() if p.name.startswith("variations-scene")]) == 2
