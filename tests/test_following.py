"""data.following reads scenes back as a person would: shapes anywhere and turned any way, and how far
apart one caption's images are."""

import pytest

from data.following import background_noise, diversity, read_scene, score, score_by_shape
from data.scenes import Scene, SceneObject, make_sample, render, scene_of
from data.synthetic import PRESETS


def _heldout(preset: str, n: int, resolution: int = 64):
    samples = [make_sample(0, "heldout", i, resolution, PRESETS[preset]) for i in range(n)]
    return [image for image, _ in samples], [scene.caption for _, scene in samples]


def _save_generated(folder, images, captions) -> None:
    """The images as python -m unclip.sample writes them: PNGs whose provenance record names the prompt."""
    from unclip.provenance import save_png

    folder.mkdir(exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        save_png(image, folder / f"{i:02d}.png", {"prompt": caption}, watermark=False)


@pytest.mark.parametrize("preset", ["simple", "varied", "moved"])
def test_real_scenes_read_back_right(preset):
    images, captions = _heldout(preset, 60)
    result = score(images, captions)
    assert result["images"] == 60 and result["all"] == 1.0


def test_a_turned_shape_reads_as_itself_not_as_another():
    import numpy as np

    rng = np.random.default_rng(3)
    for shape in ("square", "triangle", "star"):
        scene = scene_of(rng, PRESETS["varied"], shape, "red", "big", "white")
        scene.objects[0].angle = 37.0
        reading = read_scene(render(scene, 64), ("circle", "square", "triangle", "star"))
        assert (reading.shape, reading.color, reading.background) == (shape, "red", "white")


def test_a_wrong_shape_is_counted_wrong():
    images, captions = _heldout("varied", 8)
    wrong = [c.replace("circle", "X").replace("square", "circle").replace("X", "square") for c in captions]
    assert any(w != c for w, c in zip(wrong, captions))
    changed = sum(w != c for w, c in zip(wrong, captions))
    assert score(images, wrong)["shape"] == pytest.approx(1 - changed / len(captions))


def test_the_shapes_read_wrong_are_named():
    images, captions = _heldout("varied", 40)
    assert set(score_by_shape(images, captions).values()) == {1.0}
    swapped = [c.replace("circle", "X").replace("square", "circle").replace("X", "square") for c in captions]
    by_shape = score_by_shape(images, swapped)
    assert by_shape["circle"] == by_shape["square"] == 0.0 and by_shape["star"] == by_shape["triangle"] == 1.0


def test_diversity_is_zero_for_copies_and_positive_for_varied_scenes():
    images, captions = _heldout("varied", 1)
    copies = diversity(images * 4, captions * 4, scenes="varied")
    assert copies["captions"] == 1 and copies["generated"] == 0.0 and copies["real"] > 0.1
    centred = diversity(images * 4, captions * 4, scenes="simple")
    assert centred["real"] < 0.02  # the simple preset centres every shape: nothing to spread


def test_diversity_of_moved_shapes_is_their_distance():
    objects = [SceneObject("circle", "red", "medium", x, 0.5, 0.15) for x in (0.25, 0.75)]
    caption = "a red circle on a white background"
    images = [render(Scene("white", [o], None, caption), 64) for o in objects]
    assert diversity(images, [caption] * 2)["generated"] == pytest.approx(0.5, abs=0.03)


def test_background_noise_is_zero_for_real_scenes_and_the_strays_mean_for_a_grid():
    """Real backgrounds are flat; one off by 12 in every other 4-pixel cell (the tiny decoder's cell grid)
    strays 6 on average, and the shape's own pixels and edges do not count."""
    import numpy as np
    from PIL import Image

    images, _ = _heldout("moved", 8, resolution=256)
    assert [background_noise(image) for image in images] == [0.0] * 8
    arr = np.asarray(images[0], np.float32).copy()
    background = arr[0, 0].copy()
    cells = (np.indices((256, 256)) // 16).sum(0) % 2 == 1  # 16 px at 256: 4 px where it is read (64)
    flat = (arr == background).all(-1)
    arr[cells & flat] = np.clip(background + np.where(background > 127, -12, 12), 0, 255)
    assert background_noise(Image.fromarray(arr.astype(np.uint8))) == pytest.approx(6.0, abs=1.0)


def test_the_cli_reads_generated_images_by_their_provenance(tmp_path, capsys):
    """python -m data.following on PNGs carrying unclip's provenance record (the prompt): the scores,
    each shape's, as JSON; a folder without such PNGs is an error."""
    import json

    from data.following import main

    _save_generated(tmp_path, *_heldout("varied", 12))
    assert main([str(tmp_path), "--json", "--preset", "varied"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["all"] == 1.0 and result["images"] == 12 and set(result["by_shape"].values()) == {1.0}
    assert result["background_noise"] == 0.0
    assert main([str(tmp_path / "none")]) == 1


def test_the_diversity_reference_follows_the_shard_folders_manifest(tmp_path, capsys):
    """`--shards`: the real reference scenes are placed as the shard folder's manifest says (a moved set
    gives the moved preset's figure, whatever --preset says); a folder without a manifest, a manifest with
    scene settings this version does not know, and an unknown preset are one-line errors."""
    import json

    from data.following import main
    from data.synthetic import main as synthetic

    images, captions = _heldout("moved", 8)
    _save_generated(tmp_path, images * 2, captions * 2)  # two images per caption
    synthetic(["--out", str(tmp_path / "shards"), "--preset", "moved", "--num-samples", "2", "--resolution", "16"])
    capsys.readouterr()  # what data.synthetic printed

    def real_spread(*args: str) -> float:
        assert main([str(tmp_path), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["diversity"]["real"]

    moved = real_spread("--preset", "moved")
    centred = real_spread("--preset", "simple")
    assert centred < 0.01 and moved > 0.05  # centred scenes differ only by their size's rounding
    assert real_spread("--preset", "simple", "--shards", str(tmp_path / "shards")) == moved
    assert main([str(tmp_path), "--shards", str(tmp_path)]) == 2
    assert "holds no _synthetic.json" in capsys.readouterr().err
    manifest = tmp_path / "shards" / "_synthetic.json"
    manifest.write_text(manifest.read_text().replace('"max_objects"', '"halo": 1, "max_objects"'))
    assert main([str(tmp_path), "--shards", str(tmp_path / "shards")]) == 2  # a newer writer's manifest
    assert "does not know: halo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--preset", "nonesuch"])


def test_min_diversity_fails_when_a_captions_candidates_stand_in_one_place(tmp_path, capsys):
    """--min-diversity (the range demo's check that a caption's candidates differ): four copies of one
    moved scene fail it, four real moved scenes of the caption pass; without it, nothing is checked."""
    import numpy as np

    from data.following import main
    from data.scenes import render

    caption = "a red circle on a white background"
    rng = np.random.default_rng(1)
    placed = [render(scene_of(rng, PRESETS["moved"], "circle", "red", "medium", "white"), 64) for _ in range(4)]
    _save_generated(tmp_path / "copies", [placed[0]] * 4, [caption] * 4)
    _save_generated(tmp_path / "placed", placed, [caption] * 4)
    check = ["--preset", "moved", "--min-diversity", "0.5"]
    assert main([str(tmp_path / "copies"), "--preset", "moved"]) == 0
    assert main([str(tmp_path / "copies"), *check]) == 1
    assert "the candidates do not differ in layout" in capsys.readouterr().err
    assert main([str(tmp_path / "placed"), *check]) == 0
    assert main([str(tmp_path / "placed"), "--json", *check]) == 0
    assert main([str(tmp_path / "copies"), "--json", *check]) == 1
    with pytest.raises(SystemExit):  # argparse's one-line error
        main([str(tmp_path / "placed"), "--min-diversity", "-1"])
