"""The streaming loader: round trip, damaged input, rank/worker splits, resume position, joins."""

from __future__ import annotations

import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from data.embeddings import write_part
from data.loader import DataConfig, DataError, ShardLoader, list_shards
from tests.helpers import clean_members, garbled_scan, image_bytes, random_image, write_tar


def _cfg(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), resolution=32, crop="center", resampled=False, shuffle_buffer=0, num_workers=0)
    return DataConfig(**(base | kw))


def _collect(loader: ShardLoader) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for batch in loader:
        for key, caption, pixels in zip(batch["key"], batch["caption"], batch["image"]):
            assert key not in out, f"{key} delivered twice"
            out[key] = (caption, pixels.permute(1, 2, 0).numpy())
    return out


def test_round_trip_same_captions_and_pixels(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    for shard, fmt in ((0, "jpg"), (1, "png")):
        members, t = clean_members(rng, [f"{shard}{i:03d}" for i in range(12)], fmt=fmt)
        write_tar(tmp_path / f"{shard:05d}.tar", members)
        truth |= {k: v + (fmt,) for k, v in t.items()}
    got = _collect(ShardLoader(_cfg(tmp_path), batch_size=5, repeat=False, shuffle=False))
    assert set(got) == set(truth)
    for key, (caption, pixels, fmt) in truth.items():
        assert got[key][0] == caption
        diff = np.abs(got[key][1].astype(int) - pixels.astype(int))
        if fmt == "png":
            assert diff.max() == 0
        else:  # JPEG quality 95 on smooth images
            assert diff.mean() < 4.0 and diff.max() < 48


def test_garbled_jpeg_data_is_caught_where_pil_would_not_notice():
    import io

    from PIL import Image

    from data.decode import SkipSample, decode_image

    rng = np.random.default_rng(3)
    jpeg = image_bytes(random_image(rng, 64), "JPEG")
    bad = garbled_scan(jpeg)
    Image.open(io.BytesIO(bad)).load()  # PIL: no complaint
    assert decode_image(jpeg).size == (64, 64)
    with pytest.raises(SkipSample, match="corrupt_image: JPEG: Corrupt JPEG data"):
        decode_image(bad)


def _damaged_shard(tmp_path: Path, rng) -> tuple[Path, set[str]]:
    """One shard with every kind of bad sample next to convertible odd ones; returns the keys that
    must arrive."""
    members, truth = clean_members(rng, ["a000", "a001", "a002"])
    good = set(truth)
    pixels = random_image(rng)
    jpeg = image_bytes(pixels, "JPEG")
    members += [("bad_garbled.jpg", rng.bytes(500)), ("bad_garbled.txt", b"noise")]
    members += [("bad_trunc.jpg", jpeg[: len(jpeg) // 2]), ("bad_trunc.txt", b"cut")]
    members += [("bad_nocap.jpg", jpeg)]
    members += [("bad_scan.jpg", garbled_scan(jpeg)), ("bad_scan.txt", b"scan bytes overwritten")]
    members += [("bad_empty.jpg", jpeg), ("bad_empty.txt", b"   \n")]
    cmyk = image_bytes(np.asarray(pixels), "JPEG")
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buf, format="JPEG")
    members += [("odd_cmyk.jpg", buf.getvalue()), ("odd_cmyk.txt", b"cmyk")]
    sixteen = (rng.integers(0, 65535, (32, 32))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(sixteen).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    members += [("odd_16bit.png", buf.getvalue()), ("odd_16bit.txt", b"sixteen bit")]
    rgba = np.dstack([pixels, np.full((32, 32), 128, np.uint8)])
    members += [("odd_rgba.png", image_bytes(rgba, "PNG")), ("odd_rgba.txt", b"alpha")]
    members += [("odd_gray.png", image_bytes(pixels[..., 0], "PNG")), ("odd_gray.txt", b"gray")]
    del cmyk
    path = write_tar(tmp_path / "00001.tar", members)
    return path, good | {"odd_cmyk", "odd_16bit", "odd_rgba", "odd_gray"}


def _truncated_shard(tmp_path: Path, rng) -> tuple[Path, set[str]]:
    """Six samples, the file cut inside the fifth sample's image: the first four must arrive."""
    keys = [f"c{i:03d}" for i in range(6)]
    members, _ = clean_members(rng, keys)
    path = write_tar(tmp_path / "00002.tar", members)
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "c004.jpg").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])
    return path, set(keys[:4])


def test_corrupted_shards_clean_samples_arrive_and_bad_ones_are_counted(tmp_path):
    rng = np.random.default_rng(1)
    members, truth = clean_members(rng, [f"z{i:03d}" for i in range(5)])
    write_tar(tmp_path / "00000.tar", members)
    _, damaged_good = _damaged_shard(tmp_path, rng)
    _, trunc_good = _truncated_shard(tmp_path, rng)
    with pytest.warns(UserWarning, match="damaged"):
        loader = ShardLoader(_cfg(tmp_path), batch_size=4, repeat=False, shuffle=False)
        got = _collect(loader)
    assert set(got) == set(truth) | damaged_good | trunc_good
    assert dict(loader.skipped) == {"corrupt_image": 3, "missing_caption": 1, "empty_caption": 1, "truncated_tar": 1}
    # converted odd modes come out as plain RGB with sensible values
    gray = got["odd_gray"][1]
    assert np.array_equal(gray[..., 0], gray[..., 1])
    assert got["odd_16bit"][1].max() > 200  # scaled from 16 bit, not clipped to black or white
    assert 0 < got["odd_16bit"][1].mean() < 255


def test_a_damaged_shard_read_again_and_again_counts_once(tmp_path):
    rng = np.random.default_rng(2)
    _truncated_shard(tmp_path, rng)
    loader = ShardLoader(_cfg(tmp_path, resampled=True), batch_size=4, repeat=True)
    with pytest.warns(UserWarning, match="damaged"):
        batches = list(islice(loader, 6))  # the one shard, drawn six times over
    assert sum(len(b["key"]) for b in batches) == 24
    assert loader.skipped == {"truncated_tar": 1}


def test_split_by_rank_and_worker_is_disjoint_and_complete(synthetic_dir):
    # 4 shards = 2 ranks x 2 workers: each (rank, worker) stream owns exactly one shard
    cfg = _cfg(synthetic_dir / "train", num_workers=2)
    seen = []
    for rank in range(2):
        keys = set(_collect(ShardLoader(cfg, batch_size=8, rank=rank, world_size=2, repeat=False)))
        assert len(keys) == 80
        seen.append(keys)
    assert not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) == 160


def test_fewer_shards_than_streams_fails_with_advice_or_resamples(synthetic_dir):
    cfg = _cfg(synthetic_dir / "train", num_workers=3)  # 4 shards < 2 ranks x 3 workers
    with pytest.raises(DataError, match="data.resampled=true"):
        ShardLoader(cfg, batch_size=8, rank=0, world_size=2)
    cfg.resampled = True
    for rank in range(2):
        batch = next(iter(ShardLoader(cfg, batch_size=8, rank=rank, world_size=2, num_workers=0)))
        assert batch["image"].shape == (8, 3, 32, 32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled,repeat", [(True, True), (False, True), (False, False)])
def test_shard_set_with_no_usable_sample_is_an_error_not_a_hang(tmp_path, resampled, repeat):
    for i in range(3):  # captions without images
        write_tar(tmp_path / f"{i:05d}.tar", [(f"k{i}.txt", b"a caption")])
    loader = ShardLoader(_cfg(tmp_path, resampled=resampled), batch_size=2, repeat=repeat)
    with pytest.raises(DataError, match="missing_image"):
        next(iter(loader))


def test_missing_shard_paths_are_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_shards(str(tmp_path / "00000.tar"))
    with pytest.raises(DataError, match="no .tar"):
        list_shards(str(tmp_path))
    # a range over one existing shard: how many exist, and the folder form that reads what is there
    write_tar(tmp_path / "00000.tar", [("k.txt", b"a caption")])
    with pytest.raises(DataError, match=r"names 4 shards, of which 1 exist") as e:
        list_shards(str(tmp_path / "{00000..00003}.tar"))
    assert f"data.shards={tmp_path}" in str(e.value) and "00001.tar is the first missing" in str(e.value)
    with pytest.raises(DataError, match="python -m data.synthetic --out"):  # the built-in set: how to make it
        list_shards(str(tmp_path / "datasets" / "synthetic" / "train"))


def test_resume_continues_exactly_where_it_stopped(synthetic_dir):
    cfg = DataConfig(
        shards=str(synthetic_dir / "train"),
        resolution=24,
        crop="random",
        resampled=True,
        shuffle_buffer=16,
        num_workers=2,
    )
    first = ShardLoader(cfg, batch_size=6, seed=3)
    it = iter(first)
    for _ in range(5):  # an odd count: the next batch comes from the second worker
        next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(4)]
    resumed = ShardLoader(cfg, batch_size=6, seed=3)
    assert resumed.load_state_dict(state)
    got = [b for _, b in zip(range(4), resumed)]
    for a, b in zip(expected, got):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"])  # the same random crops too


def test_resume_with_another_layout_reseeds_instead_of_replaying(synthetic_dir):
    cfg = _cfg(synthetic_dir / "train", resampled=True, num_workers=1)
    loader = ShardLoader(cfg, batch_size=4, world_size=1)
    next(iter(loader))
    other = ShardLoader(cfg, batch_size=4, world_size=1, num_workers=0)
    assert not other.load_state_dict(loader.state_dict())
    assert other.seed != loader.seed


def test_embeddings_are_joined_by_key_and_missing_ones_counted(synthetic_dir, tmp_path):
    shard = sorted(Path(synthetic_dir / "train").glob("*.tar"))[0]
    keys = [f"{i:09d}" for i in range(40)]
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(39, 8)).astype(np.float16), rng.normal(size=(39, 8)).astype(np.float16)
    img[5, 2], txt[7, 0] = np.nan, np.inf  # what a broken embedding run leaves
    write_part(tmp_path, "00000", keys[:39], ["c"] * 39, img, txt)  # the last key has none
    cfg = _cfg(shard, embeddings=str(tmp_path))
    loader = ShardLoader(cfg, batch_size=12, repeat=False, shuffle=False)
    batches = list(loader)
    assert loader.skipped == {"missing_embedding": 1, "nonfinite_embedding": 2}
    got_keys = sum((b["key"] for b in batches), [])
    got_img = torch.cat([b["img_emb"] for b in batches])
    good = [i for i in range(39) if i not in (5, 7)]
    assert got_keys == [keys[i] for i in good]
    assert torch.allclose(got_img, torch.from_numpy(img[good].astype(np.float32)))
    # the embeddings-only path (the prior's, and its normalization statistics) skips them too
    alone = ShardLoader(_cfg(shard, embeddings=str(tmp_path), load_images=False), batch_size=12, repeat=False)
    assert sum(len(b["key"]) for b in alone) == 37 and alone.skipped == {"nonfinite_embedding": 2}


def test_embeddings_only_batches_skip_image_decoding(synthetic_dir, tmp_path):
    shard = sorted(Path(synthetic_dir / "train").glob("*.tar"))[0]
    keys = [f"{i:09d}" for i in range(40)]
    write_part(tmp_path, "00000", keys, ["c"] * 40, np.ones((40, 4), np.float16), np.ones((40, 4), np.float16))
    batch = next(iter(ShardLoader(_cfg(shard, embeddings=str(tmp_path), load_images=False), batch_size=8)))
    assert "image" not in batch and batch["text_emb"].shape == (8, 4)


def test_caption_from_a_json_field_and_pipe_urls(synthetic_dir):
    shard = sorted(Path(synthetic_dir / "train").glob("*.tar"))[0]
    by_txt = _collect(ShardLoader(_cfg(shard), batch_size=8, repeat=False, shuffle=False))
    by_json = _collect(
        ShardLoader(_cfg(f"pipe:cat {shard}", caption_key="json:caption"), batch_size=8, repeat=False, shuffle=False)
    )
    assert {k: v[0] for k, v in by_txt.items()} == {k: v[0] for k, v in by_json.items()}


def test_heldout_auto_splits_the_training_samples_by_key(synthetic_dir):
    """data.heldout=auto: training and validation read the same shards and keep disjoint sides of a
    fixed split by key, whatever the order; without it and without a held-out set, no validation."""
    from data.loader import held_out, split_heldout

    base = _cfg(synthetic_dir / "train")
    assert split_heldout(base) == (base, None)
    train, heldout = split_heldout(_cfg(synthetic_dir / "train", heldout="auto", heldout_fraction=0.2))
    keys_train = set(_collect(ShardLoader(train, batch_size=8, repeat=False, shuffle=False)))
    keys_held = set(
        _collect(ShardLoader(heldout, batch_size=8, repeat=False, shuffle=False, shards=heldout.heldout_shards))
    )
    everything = set(_collect(ShardLoader(base, batch_size=8, repeat=False, shuffle=False)))
    assert keys_train.isdisjoint(keys_held) and keys_train | keys_held == everything
    assert 0.1 < len(keys_held) / len(everything) < 0.3
    assert all(held_out(k, 0.2) for k in keys_held) and not any(held_out(k, 0.2) for k in keys_train)
    given = _cfg(synthetic_dir / "train", heldout="auto", heldout_shards=str(synthetic_dir / "heldout"))
    assert split_heldout(given) == (given, given)  # a held-out set given wins
    with pytest.raises(ValueError, match="given or auto"):
        split_heldout(_cfg(synthetic_dir / "train", heldout="yes"))
