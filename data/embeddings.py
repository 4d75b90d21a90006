"""Precomputed CLIP embeddings on disk, in clip-retrieval's layout (which data.embed writes too):

    ROOT/img_emb/img_emb_<part>.npy           (N, E) image embeddings
    ROOT/text_emb/text_emb_<part>.npy         (N, E) text embeddings
    ROOT/metadata/metadata_<part>.parquet     N rows: `key` (or clip-retrieval's `image_path`), `caption`
    ROOT/clip.json                            which CLIP made them (written by data.embed)

Rows are joined to shard samples by key. A part is complete once its metadata file exists: the
metadata is renamed into place last, so a killed precompute leaves no half part behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip.records import read_json_object

INFO_FILE = "clip.json"


def _part_of(path: Path, prefix: str) -> str:
    m = re.fullmatch(rf"{prefix}_(.+)\.(npy|parquet)", path.name)
    if not m:
        raise ValueError(f"unexpected file {path} in an embedding folder")
    return m.group(1)


def _key_from_path(image_path: str) -> str:
    """clip-retrieval stores the sample's path or key in `image_path`; the key is its stem."""
    return os.path.basename(str(image_path)).split(".")[0]


class EmbeddingStore:
    """Read access to an embedding folder: by part (for embeddings-only training) or by key (a join)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_dir = self.root / "metadata"
        if not (self.root / "img_emb").is_dir() or not meta_dir.is_dir():
            raise FileNotFoundError(
                f"{self.root} is not an embedding folder (no img_emb/ and metadata/). "
                "Make one with: python -m data.embed --shards ... --out " + str(self.root)
            )
        self.parts = sorted(_part_of(p, "metadata") for p in meta_dir.glob("metadata_*.parquet"))
        if not self.parts:
            raise ValueError(f"{self.root} holds no complete part (metadata/metadata_*.parquet)")
        self._index: dict[str, tuple[str, int]] | None = None
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    @property
    def info(self) -> dict[str, Any] | None:
        """What data.embed recorded of the CLIP (fingerprint, arch, embed_dim); None for foreign sets."""
        path = self.root / INFO_FILE
        return read_json_object(path, "embedding record") if path.exists() else None

    @property
    def embed_dim(self) -> int:
        return int(self._array("img", self.parts[0]).shape[1])

    def _array(self, kind: str, part: str) -> np.ndarray:
        if (kind, part) not in self._arrays:
            path = self.root / f"{kind}_emb" / f"{kind}_emb_{part}.npy"
            if not path.exists():
                raise FileNotFoundError(f"embedding part {part} lacks {path}")
            try:  # never allow_pickle: an object array would unpickle whatever the file holds
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise ValueError(
                    f"{path} is not a numeric embedding array ({e}): recompute it with data.embed"
                ) from None
            if array.dtype.kind != "f" or array.ndim != 2:
                raise ValueError(f"{path} holds a {array.dtype} array of shape {array.shape}, not (N, D) floats")
            self._arrays[kind, part] = array
        return self._arrays[kind, part]

    def metadata(self, part: str) -> dict[str, list]:
        table = pq.read_table(self.root / "metadata" / f"metadata_{part}.parquet")
        cols = table.column_names
        if "key" in cols:
            keys = [str(k) for k in table.column("key").to_pylist()]
        elif "image_path" in cols:
            keys = [_key_from_path(p) for p in table.column("image_path").to_pylist()]
        else:
            raise ValueError(f"metadata part {part} has neither a `key` nor an `image_path` column")
        captions = table.column("caption").to_pylist() if "caption" in cols else [None] * len(keys)
        return {"key": keys, "caption": captions}

    def load_part(self, part: str) -> dict[str, Any]:
        """One part whole: keys, captions, image and text embeddings (float32)."""
        meta = self.metadata(part)
        img, txt = self._array("img", part), self._array("text", part)
        if not (len(meta["key"]) == len(img) == len(txt)):
            raise ValueError(
                f"embedding part {part}: {len(meta['key'])} rows of metadata, {len(img)} image "
                f"and {len(txt)} text embeddings; rerun data.embed for this part"
            )
        return meta | {"img_emb": np.asarray(img, np.float32), "text_emb": np.asarray(txt, np.float32)}

    def lookup(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(image embedding, text embedding) for a sample key, or None if the set lacks it."""
        if self._index is None:
            self._index = {}
            for part in self.parts:
                for row, k in enumerate(self.metadata(part)["key"]):
                    self._index[k] = (part, row)
        hit = self._index.get(key)
        if hit is None:
            return None
        part, row = hit
        return (
            np.asarray(self._array("img", part)[row], np.float32),
            np.asarray(self._array("text", part)[row], np.float32),
        )


def part_complete(root: Path, part: str) -> bool:
    return (root / "metadata" / f"metadata_{part}.parquet").exists()


def write_part(root: Path, part: str, keys: list[str], captions: list[str], img: np.ndarray, txt: np.ndarray) -> None:
    """Write one part atomically: arrays first, metadata (the completion mark) last."""
    if not (len(keys) == len(captions) == len(img) == len(txt)):
        raise AssertionError("rows of one part must line up")
    for kind, arr in (("img", img), ("text", txt)):
        folder = root / f"{kind}_emb"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{kind}_emb_{part}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, folder / f"{kind}_emb_{part}.npy")
    meta_dir = root / "metadata"
    meta_dir.mkdir(parents=True, exist_ok=True)
    tmp = meta_dir / f".metadata_{part}.parquet.tmp"
    pq.write_table(pa.table({"key": keys, "caption": captions}), tmp)
    os.replace(tmp, meta_dir / f"metadata_{part}.parquet")
