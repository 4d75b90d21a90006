"""The synthetic data set: deterministic, captions that name what is drawn, fast enough."""

from __future__ import annotations

import json
import tarfile
import time

import numpy as np
import pytest

from data.scenes import PALETTE, SceneConfig, make_sample
from data.synthetic import main as synthetic_main
from data.synthetic import write_synthetic


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_vocabulary_and_caption_template():
    for color in ("red", "green", "blue", "yellow", "purple", "orange", "black", "white"):
        assert color in PALETTE
    cfg = SceneConfig()
    assert {"circle", "square", "triangle", "star"} <= set(cfg.shapes)
    narrow = SceneConfig(
        colors=["red", "orange"], backgrounds=["white"], shapes=["circle"], sizes=["medium"], max_objects=1
    )
    captions = {make_sample(0, "train", i, 16, narrow)[1].caption for i in range(20)}
    assert captions == {"a red circle on a white background", "an orange circle on a white background"}


def test_sample_depends_only_on_seed_split_index(tmp_path):
    a = write_synthetic(tmp_path / "a", num_samples=30, resolution=32, samples_per_shard=7, progress=False)
    b = write_synthetic(tmp_path / "b", num_samples=30, resolution=32, samples_per_shard=30, workers=2, progress=False)
    files_a = {k: v for p in sorted(a.glob("*.tar")) for k, v in _members(p).items()}
    files_b = {k: v for p in sorted(b.glob("*.tar")) for k, v in _members(p).items()}
    assert files_a == files_b and len(files_a) == 90
    heldout, _ = make_sample(0, "heldout", 3, 32, SceneConfig())
    train, _ = make_sample(0, "train", 3, 32, SceneConfig())
    assert not np.array_equal(np.asarray(heldout), np.asarray(train))


@pytest.mark.parametrize("resolution", [16, 64, 256])
def test_pixels_show_what_the_caption_names(simple_scene, resolution):
    for index in range(20):
        image, scene = make_sample(1, "train", index, resolution, simple_scene)
        assert image.size == (resolution, resolution)
        px = np.asarray(image).astype(int)
        obj = scene.objects[0]
        article = "an" if scene.background[0] in "aeiou" else "a"
        assert scene.caption == f"a big {obj.color} {obj.shape} on {article} {scene.background} background"
        centre = px[resolution // 2, resolution // 2]
        corner = px[1, 1]
        assert np.abs(centre - PALETTE[obj.color]).max() <= 12, (scene.caption, centre)
        assert np.abs(corner - PALETTE[scene.background]).max() <= 12, (scene.caption, corner)


def test_relations_put_objects_where_the_caption_says():
    cfg = SceneConfig(max_objects=2, p_two_objects=1.0)
    for i in range(50):
        _, scene = make_sample(0, "train", i, 64, cfg)
        a, b = scene.objects
        assert scene.relation in scene.caption
        if scene.relation == "above":
            assert a.y + a.r <= b.y - b.r
        elif scene.relation == "below":
            assert a.y - a.r >= b.y + b.r
        elif scene.relation == "to the left of":
            assert a.x + a.r <= b.x - b.r
        else:
            assert a.x - a.r >= b.x + b.r
        for o in scene.objects:
            assert o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r


def test_shards_hold_img2dataset_layout(tmp_path):
    out = write_synthetic(tmp_path, num_samples=5, resolution=32, image_format="jpg", progress=False)
    files = _members(out / "00000.tar")
    assert set(files) == {f"{i:09d}.{e}" for i in range(5) for e in ("jpg", "txt", "json")}
    meta = json.loads(files["000000000.json"])
    assert (meta["width"], meta["height"], meta["source"]) == (32, 32, "synthetic")
    assert meta["caption"] == files["000000000.txt"].decode()


def test_writing_ten_thousand_at_64px_is_well_under_a_minute(tmp_path):
    start = time.perf_counter()
    write_synthetic(tmp_path, num_samples=2000, resolution=64, progress=False)
    assert time.perf_counter() - start < 12  # 2,000 in 12 s is 10,000 in a minute; measured ~6x faster


def test_rerun_resumes_and_mixed_settings_are_refused(tmp_path):
    write_synthetic(tmp_path, num_samples=20, resolution=16, samples_per_shard=10, progress=False)
    (tmp_path / "00001.tar").unlink()  # as if killed before the second shard
    write_synthetic(tmp_path, num_samples=20, resolution=16, samples_per_shard=10, progress=False)
    assert (tmp_path / "00001.tar").exists()
    with pytest.raises(ValueError, match="resolution"):
        write_synthetic(tmp_path, num_samples=20, resolution=32, samples_per_shard=10, progress=False)


def test_cli_writes_shards_and_a_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    synthetic_main(
        [
            "--out",
            str(tmp_path / "s"),
            "--num-samples",
            "12",
            "--resolution",
            "32",
            "--contact-sheet",
            str(sheet),
            "--contact-sheet-count",
            "8",
        ]
    )
    from PIL import Image

    assert Image.open(sheet).size[0] > 8 * 100
    assert str(sheet) in capsys.readouterr().out


def test_bad_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="not allowed"):
        SceneConfig(shapes=["dodecahedron"]).validate()


def test_position_grid_moves_shapes_in_whole_steps_inside_the_margin():
    """`position_grid` keeps the free draw's spread (every step the margin allows is used) and its
    random stream (the same captions as without it), and puts every centre on the grid."""
    free = SceneConfig(max_objects=1, position_jitter=0.5, sizes=["medium", "big"])
    grid = SceneConfig(**vars(free) | {"position_grid": 16})
    offsets = set()
    for index in range(300):
        _, a = make_sample(0, "train", index, 32, free)
        _, b = make_sample(0, "train", index, 32, grid)
        assert a.caption == b.caption
        obj = b.objects[0]
        for centre in (obj.x, obj.y):
            step = (centre - 0.5) * 16
            assert abs(step - round(step)) < 1e-9  # the raw centre, not to_json's 4-digit rounding
            assert abs(centre - 0.5) <= (0.5 - obj.r - 0.03) * 0.5 + 1e-4
            offsets.add((obj.size, round(step)))
    # medium shapes take 5 steps a side (-2..2), big ones 3 (-1..1): all of them, none beyond
    assert offsets == {("medium", s) for s in range(-2, 3)} | {("big", s) for s in range(-1, 2)}
    with pytest.raises(ValueError, match="position_grid"):
        SceneConfig(position_grid=-1).validate()


def test_a_set_written_before_a_scene_option_existed_still_resumes(tmp_path):
    """A manifest without `position_grid` (written before it existed) is the same set as one with its
    default: a rerun resumes it; another value is still refused."""
    out = write_synthetic(tmp_path / "s", num_samples=4, resolution=16, progress=False)
    manifest = json.loads((out / "_synthetic.json").read_text())
    del manifest["scene"]["position_grid"]
    (out / "_synthetic.json").write_text(json.dumps(manifest))
    write_synthetic(out, num_samples=4, resolution=16, progress=False)
    with pytest.raises(ValueError, match="scene differ"):
        write_synthetic(out, num_samples=4, resolution=16, progress=False, scene=SceneConfig(position_grid=8))
