"""data.shards: folders and tables of images + captions into shards, bad input skipped and counted."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.loader import DataConfig, ShardLoader
from data.shards import main as shards_main
from data.shards import pairs_from_folder, write_shards
from tests.helpers import random_image


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(random_image(rng, 48)).save(src / f"img{i}.jpg", quality=95)
        (src / f"img{i}.txt").write_text(f"photo number {i}")
    Image.fromarray(random_image(rng, 40)).convert("CMYK").save(src / "sub" / "cmyk.jpg")
    (src / "sub" / "cmyk.txt").write_text("a cmyk photo")
    Image.fromarray(random_image(rng, 40)).save(src / "nocaption.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (src / "broken.txt").write_text("broken")
    Image.fromarray(random_image(rng, 40)).save(src / "blank.png")
    (src / "blank.txt").write_text("  ")
    return src


def test_folder_to_shards_counts_what_it_skips(tmp_path, capsys):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    shards_main(["--input", str(src), "--out", str(out), "--samples-per-shard", "3"])
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["written"] == 6 and summary["input_samples"] == 9
    assert summary["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    assert "skipped" in capsys.readouterr().out
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert {"width", "height", "source"} <= set(meta)
    # what was written streams back with its captions; CMYK was converted to RGB on write
    cfg = DataConfig(shards=str(out), resolution=32, crop="center", resampled=False, num_workers=0)
    captions = {c for b in ShardLoader(cfg, batch_size=4, repeat=False) for c in b["caption"]}
    assert captions == {f"photo number {i}" for i in range(5)} | {"a cmyk photo"}


def test_resize_on_write(tmp_path):
    src = _folder(tmp_path)
    out = tmp_path / "out"
    write_shards(pairs_from_folder(src), out, resize=24, resize_mode="center_crop", progress=False)
    with tarfile.open(out / "00000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg"):
                assert Image.open(io.BytesIO(tar.extractfile(m).read())).size == (24, 24)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables_with_image_and_caption_columns(tmp_path, kind):
    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    paths, caps = [], []
    for i in range(4):
        Image.fromarray(random_image(rng, 32)).save(tmp_path / "imgs" / f"{i}.png")
        paths.append(f"imgs/{i}.png")
        caps.append(f"row {i}")
    paths.append("imgs/missing.png")
    caps.append("gone")
    table = pa.table({"path": paths, "text": caps})
    table_path = tmp_path / f"pairs.{kind}"
    if kind == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, table_path)
    else:
        pq.write_table(table, table_path)
    out = tmp_path / "out"
    shards_main(
        [
            "--input",
            str(table_path),
            "--out",
            str(out),
            "--image-column",
            "path",
            "--caption-column",
            "text",
            "--format",
            "png",
        ]
    )
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["written"] == 4 and summary["skipped"] == {"missing_file": 1}


def test_unknown_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"a": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(SystemExit, match="no column 'image'"):
        shards_main(["--input", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o")])


def test_a_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="missing.csv does not exist"):
        shards_main(["--input", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")])


def test_bad_captions_disguised_formats_and_huge_images(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(random_image(rng, 40)).save(src / "latin1.jpg")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    Image.fromarray(random_image(rng, 40)).save(src / "disguised.jpg", format="PNG")  # PNG bytes named .jpg
    (src / "disguised.txt").write_text("a png in disguise")
    Image.fromarray(random_image(rng, 300)).save(src / "big.png")
    (src / "big.txt").write_text("a big one")
    out = tmp_path / "out"
    summary = write_shards(pairs_from_folder(src), out, image_format="png", max_side=128, progress=False)
    assert summary["written"] == 2 and summary["skipped"] == {"bad_caption_encoding": 1}
    with tarfile.open(out / "00000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    images = {n: Image.open(io.BytesIO(b)) for n, b in files.items() if n.endswith((".png", ".jpg"))}
    assert all(n.endswith(".png") and im.format == "PNG" for n, im in images.items())  # stored as what it is
    assert sorted(im.size for im in images.values()) == [(40, 40), (128, 128)]  # the big one downscaled
    assert not any("\ufffd" in b.decode() for n, b in files.items() if n.endswith(".txt"))


def test_images_over_the_pixel_limit_are_skipped_unread(tmp_path):
    from data.decode import SkipSample, decode_image
    from tests.helpers import image_bytes

    data = image_bytes(np.zeros((600, 500, 3), np.uint8))
    assert decode_image(data, max_pixels=300_000).size == (500, 600)
    with pytest.raises(SkipSample, match="too_large: 500x600 > 200000 pixels"):
        decode_image(data, max_pixels=200_000)
