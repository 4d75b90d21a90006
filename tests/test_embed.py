"""data.embed: precomputed embeddings match the CLIP, resume per shard, and read clip-retrieval sets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.embed import embed_shards
from data.embed import main as embed_main
from data.embeddings import EmbeddingStore
from data.loader import DataConfig, ShardLoader
from train.config import compose, to_object
from unclip.clip import build_clip


@pytest.fixture(scope="module")
def clip_and_cfg():
    cfg = to_object(compose("clip")).model.clip
    cfg.frozen = True
    torch.manual_seed(0)
    return build_clip(cfg), cfg


def test_embeddings_match_the_clip_and_resume_per_shard(synthetic_dir, tmp_path, clip_and_cfg):
    clip, cfg = clip_and_cfg
    out = tmp_path / "emb"
    embed_shards(str(synthetic_dir / "train"), clip, cfg, out, batch_size=32, progress=False)
    store = EmbeddingStore(out)
    assert store.parts == ["00000", "00001", "00002", "00003"]
    assert store.info["fingerprint"] == clip.fingerprint() and store.embed_dim == clip.embed_dim
    part = store.load_part("00001")
    assert len(part["key"]) == 40
    # recompute a few directly through the loader's decode path
    loader = ShardLoader(
        DataConfig(
            shards=str(synthetic_dir / "train" / "00001.tar"),
            resolution=32,
            crop="center",
            resampled=False,
            num_workers=0,
        ),
        batch_size=5,
        repeat=False,
        shuffle=False,
    )
    batch = next(iter(loader))
    with torch.no_grad():
        img = clip.encode_image(batch["image"].float() / 127.5 - 1).numpy()
        txt = clip.encode_captions(batch["caption"]).embedding.numpy()
    assert part["key"][:5] == batch["key"] and part["caption"][:5] == batch["caption"]
    np.testing.assert_allclose(part["img_emb"][:5], img, atol=2e-3, rtol=2e-3)  # stored as fp16
    np.testing.assert_allclose(part["text_emb"][:5], txt, atol=2e-3, rtol=2e-3)
    # resume: a finished part is not recomputed, a missing one is
    (out / "metadata" / "metadata_00002.parquet").unlink()
    before = (out / "img_emb" / "img_emb_00001.npy").stat().st_mtime_ns
    embed_shards(str(synthetic_dir / "train"), clip, cfg, out, batch_size=32, progress=False)
    assert (out / "img_emb" / "img_emb_00001.npy").stat().st_mtime_ns == before
    assert "00002" in EmbeddingStore(out).parts


def test_ranks_split_the_shards(synthetic_dir, tmp_path, clip_and_cfg):
    clip, cfg = clip_and_cfg
    for rank in range(2):
        embed_shards(
            str(synthetic_dir / "train"), clip, cfg, tmp_path, batch_size=64, rank=rank, world_size=2, progress=False
        )
    assert EmbeddingStore(tmp_path).parts == ["00000", "00001", "00002", "00003"]


def test_another_clip_into_the_same_folder_is_refused(synthetic_dir, tmp_path, clip_and_cfg):
    clip, cfg = clip_and_cfg
    embed_shards(str(synthetic_dir / "heldout"), clip, cfg, tmp_path, progress=False)
    torch.manual_seed(99)
    other = build_clip(cfg)
    with pytest.raises(ValueError, match="another CLIP"):
        embed_shards(str(synthetic_dir / "heldout"), other, cfg, tmp_path, progress=False)


def test_cli_with_an_export_folder(synthetic_dir, tmp_path, clip_and_cfg, capsys):
    clip, _ = clip_and_cfg
    clip.export(tmp_path / "export")
    embed_main(
        [
            "--shards",
            str(synthetic_dir / "heldout"),
            "--clip",
            str(tmp_path / "export"),
            "--out",
            str(tmp_path / "emb"),
            "--batch-size",
            "16",
        ]
    )
    assert EmbeddingStore(tmp_path / "emb").info["fingerprint"] == clip.fingerprint()


def test_reads_clip_retrieval_layout(tmp_path):
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "text_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    img = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float16)
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", img)
    np.save(tmp_path / "text_emb" / "text_emb_0.npy", img * 2)
    pq.write_table(
        pa.table(
            {
                "image_path": ["00000/000000001.jpg", "00000/000000002.jpg", "x/000000003.jpg"],
                "caption": ["a", "b", "c"],
            }
        ),
        tmp_path / "metadata" / "metadata_0.parquet",
    )
    store = EmbeddingStore(tmp_path)
    assert store.info is None
    got_img, got_txt = store.lookup("000000002")
    np.testing.assert_array_equal(got_img, img[1].astype(np.float32))
    np.testing.assert_array_equal(got_txt, img[1].astype(np.float32) * 2)
    assert store.lookup("nope") is None


def test_not_an_embedding_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data.embed"):
        EmbeddingStore(tmp_path)


def test_cli_errors_name_its_own_flags(synthetic_dir, tmp_path, capsys):
    """The CLIP's errors name Hydra keys for the training entrypoints; data.embed says --flags."""
    args = ["--shards", str(synthetic_dir / "heldout"), "--out", str(tmp_path / "emb")]
    with pytest.raises(SystemExit) as missing:
        embed_main([*args, "--clip", "ViT-B-32", "--clip-checkpoint", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit) as download:
        embed_main([*args, "--clip", "ViT-B-32", "--pretrained", "openai"])
    for exit_ in (missing, download):
        assert "model.clip" not in str(exit_.value) and "--clip-checkpoint" in str(exit_.value)
    assert "--allow-download" in str(download.value)
