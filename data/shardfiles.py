"""Shard files: expanding a shard spec into a list of URLs, and reading one tar shard's raw samples.

A spec is a folder, a brace pattern (/d/{00000..00999}.tar), a glob, a `::`-separated list, or
`pipe:` URLs. Reading groups a tar's members by key (KEY.jpg + KEY.txt + KEY.json -> one sample)
and never fails: a shard that cannot be opened, is not a tar, or ends early is counted once under
its reason, and the samples before the damage are used.
"""

from __future__ import annotations

import glob
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
from webdataset.gopen import gopen

from data.embeddings import EmbeddingStore


class DataError(ValueError):
    """A shard set that cannot feed training (nothing usable, too few shards for the streams)."""


# --- shard lists ---------------------------------------------------------------------------------
def list_shards(spec: str) -> list[str]:
    """Expand a shard spec into URLs: folders (their *.tar), brace patterns, globs, "a::b" lists."""
    if not spec:
        raise DataError("no shards given: set data.shards to a folder, a brace pattern or a list")
    urls: list[str] = []
    for part in str(spec).split("::"):
        expanded = list(braceexpand.braceexpand(part.strip()))
        if len(expanded) > 1 and not all("://" in i or i.startswith("pipe:") or Path(i).exists() for i in expanded):
            raise DataError(_missing_in_range(spec, expanded))
        for item in expanded:
            if "://" in item or item.startswith("pipe:"):
                urls.append(item)
            elif Path(item).is_dir():
                found = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not found:
                    raise DataError(f"folder {item} holds no .tar shards")
                urls.extend(found)
            elif any(c in item for c in "*?["):
                urls.extend(sorted(glob.glob(item)))
            elif Path(item).is_file():
                urls.append(item)
            else:
                raise DataError(f"shard {item} does not exist (from data.shards={spec!r}){_how_to_make(item)}")
    if not urls:
        raise DataError(f"no shards match {spec!r}")
    return urls


def _missing_in_range(spec: str, expanded: list[str]) -> str:
    there = [i for i in expanded if Path(i).exists()]
    folders = sorted({str(Path(i).parent) for i in there})
    hint = f" For every shard in a folder, give the folder: data.shards={folders[0]}" if len(folders) == 1 else ""
    first_missing = next(i for i in expanded if not Path(i).exists())
    return (
        f"data.shards={spec!r} names {len(expanded)} shards, of which {len(there)} exist "
        f"({first_missing} is the first missing).{hint}"
    )


def _how_to_make(item: str) -> str:
    """For the built-in synthetic set, the command that writes it."""
    path = Path(item)
    if "synthetic" in path.parts or "demo" in path.parts:
        split = "heldout" if "heldout" in path.name else "train"
        return f". Write it first: python -m data.synthetic --out {item} --split {split} --num-samples 10000"
    return ""


EMBEDDING_SCHEME = "embeddings:"


def iter_embedding_part(url: str) -> Iterator[dict[str, Any]]:
    """Rows of one embedding part as raw samples: key, caption, and both embeddings."""
    root, part = url[len(EMBEDDING_SCHEME) :].rsplit("#", 1)
    rows = EmbeddingStore(root).load_part(part)
    for i, key in enumerate(rows["key"]):
        caption = rows["caption"][i]
        yield {
            "__key__": key,
            "__url__": url,
            "img_emb": rows["img_emb"][i],
            "text_emb": rows["text_emb"][i],
            **({"txt": caption.encode()} if caption is not None else {}),
        }


def iter_raw_samples(url: str, skipped: Counter, damaged: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar as {"__key__", "__url__", ext: bytes}, grouping consecutive files by key.

    A shard that cannot be opened, or that ends early, is counted and left; what was read of it
    before the damage is still yielded (decode then judges each sample on its own). `damaged`, the
    set of shards already found damaged by this stream, makes a shard count (and warn) once however
    often a resampling stream reads it again."""
    damaged = set() if damaged is None else damaged

    def report(reason: str, message: str) -> None:
        if url not in damaged:
            damaged.add(url)
            skipped[reason] += 1
            warnings.warn(message, stacklevel=3)

    if url.startswith(EMBEDDING_SCHEME):
        yield from iter_embedding_part(url)
        return
    try:
        stream = gopen(url)
    except Exception as e:  # missing file, failed pipe, network error
        report("unreadable_shard", f"cannot open shard {url}: {e}")
        return
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # no tar header at all
        stream.close()
        report("not_a_tar", f"shard {url} is not a tar file ({type(e).__name__}: {e}); skipped")
        return
    current: dict[str, Any] | None = None
    try:
        with stream, tar:
            for info in tar:
                if not info.isreg():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                if name.startswith(("_", ".")) or "." not in name:
                    continue  # metadata files (img2dataset's _stats.json), hidden files
                key, ext = name.split(".", 1)
                data = tar.extractfile(info).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        report("truncated_tar", f"shard {url} is damaged ({type(e).__name__}: {e}); using what came before")
    if current is not None:
        yield current
