"""The streaming loader: WebDataset-style tar shards -> batches, split by rank and by worker.

    loader = ShardLoader(cfg, batch_size=32, rank=rank, world_size=world, seed=0)
    for batch in loader:      # {"image": (B,3,H,W) uint8, "caption": [...], "key": [...], ...}
        ...
    loader.skipped            # Counter of bad samples by reason, summed over all workers
    loader.state_dict()       # the data position, for an exact resume

Rank, world size and seed are arguments: this module never reads torch.distributed or the
environment. Each (rank, worker) pair is one "stream" with its own deterministic order:

- resampled=True: every stream draws shards at random, with replacement, from the whole list
  (endless; any number of shards serves any number of ranks x workers).
- resampled=False: the shards are dealt round-robin to the streams (disjoint, complete coverage);
  with repeat=True each stream loops over its own shards, reshuffled every pass.
- split="samples": the streams are per worker only; every rank reads them all and decodes only its
  own micro-batches (raw samples j with (j // batch) % world == rank). Held-out sets use this, so
  validation sees the same samples on 1 GPU or 64, and a global batch is the same at any world size.

Position: a stream is a pure function of (seed, stream id), so "how many raw samples this stream
has emitted" is enough to restore it. On resume a stream re-reads (without decoding) up to that
point, and the DataLoader's round-robin over workers is rotated to continue with the right one.
"""

from __future__ import annotations

import hashlib
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.decode import MAX_IMAGE_PIXELS, SkipSample, decode_image, find_image, get_caption, resize_crop
from data.embeddings import EmbeddingStore
from data.shardfiles import EMBEDDING_SCHEME, DataError, iter_raw_samples, list_shards


@dataclass
class DataConfig:
    name: str = "synthetic"  # a label for run names and logs
    # Required ("???" is OmegaConf's missing value): a folder, brace pattern, glob or "::" list; pipe: URLs too.
    shards: str = "???"
    heldout_shards: str | None = None  # validation / held-out captions
    # given: heldout_shards / heldout_embeddings as set (none: no validation, with a warning) | auto:
    # with none given, a fixed heldout_fraction of the training samples (by key) is held out instead
    heldout: str = "given"
    heldout_fraction: float = 0.01
    holdout_side: str | None = None  # set by the trainer under heldout=auto: train | heldout (that side's samples)
    resolution: int = 64  # square side the images are resized and cropped to
    crop: str = "random"  # random | center
    min_image_side: int = 0  # skip images whose shorter side is smaller (0 keeps all, upsampling them)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # skip larger images unread (counted as too_large); 0: no limit
    caption_key: str = "txt"  # "txt", or "json:<field>" to read the caption from KEY.json
    embeddings: str | None = None  # folder of precomputed CLIP embeddings joined by key (data.embed)
    heldout_embeddings: str | None = None  # the same for heldout_shards
    load_images: bool = True  # False: read the embedding folder alone, no tars (the prior's fast path)
    resampled: bool = True  # draw shards with replacement: endless, no per-rank shard count limit
    split: str = "shards"  # shards: ranks read disjoint shards | samples: every rank reads all shards and
    #                        keeps every world_size-th micro-batch (a split that is the same at any GPU count)
    shuffle_buffer: int = 1000  # samples held for shuffling within each stream (0 = no shuffle)
    num_workers: int = 2  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches each worker keeps ready
    pin_memory: bool = True  # used only when CUDA is available


# --- held-out split ------------------------------------------------------------------------------
def held_out(key: str, fraction: float) -> bool:
    """Whether data.heldout=auto holds this sample out: a hash of its key, the same in every process,
    run and shard order."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def split_heldout(data: DataConfig) -> tuple[DataConfig, DataConfig | None]:
    """(what training reads, what validation reads or None). With data.heldout=auto and no held-out
    set given, both read the training data, each keeping its own side of a fixed split by key."""
    if data.heldout not in ("given", "auto"):
        raise ValueError(f"data.heldout must be given or auto, got {data.heldout!r}")
    if data.heldout_shards or data.heldout_embeddings:
        return data, data
    if data.heldout == "given":
        return data, None
    train = replace(data, holdout_side="train")
    heldout = replace(data, heldout_shards=data.shards, heldout_embeddings=data.embeddings, holdout_side="heldout")
    return train, heldout


# --- one stream per (rank, worker) ---------------------------------------------------------------
class ShardStream(IterableDataset):
    """Batches for one rank; inside a DataLoader worker it plays that worker's stream."""

    def __init__(
        self,
        urls: list[str],
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        repeat: bool,
        shuffle: bool,
        crop: str,
        start_positions: dict[int, int],
        worker_offset: int,
    ):
        self.urls, self.cfg, self.batch_size = urls, cfg, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.repeat, self.shuffle, self.crop = repeat, shuffle, crop
        self.start_positions, self.worker_offset = start_positions, worker_offset
        self._store: EmbeddingStore | None = None
        self._damaged: set[str] = set()  # shards this stream found damaged: counted once each

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        return (physical + self.worker_offset) % count, count

    def _shard_order(self, stream_id: int, n_streams: int) -> Iterator[str]:
        if self.cfg.resampled:
            rng = np.random.default_rng([self.seed, stream_id, 1])
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        mine = self.urls[stream_id::n_streams]
        epoch = 0
        while mine:
            order = list(mine)
            if self.shuffle:
                np.random.default_rng([self.seed, stream_id, 2, epoch]).shuffle(order)
            yield from order
            yield None  # end of a pass, so the caller can tell an empty pass from a slow one
            epoch += 1
            if not self.repeat:
                return

    def _raw(self, stream_id: int, n_streams: int, skipped: Counter, tally: dict) -> Iterator[dict]:
        """Raw samples in stream order, passed through the shuffle buffer (drained at each pass end)."""
        buffer: list[dict] = []
        rng = np.random.default_rng([self.seed, stream_id, 3])
        size = self.cfg.shuffle_buffer if self.shuffle else 0

        def pick() -> dict:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            return buffer.pop()

        for url in self._shard_order(stream_id, n_streams):
            if url is None:  # a pass over this stream's shards ended: drain, then it must have fed us
                while buffer:
                    yield pick()
                _check_alive(tally, skipped, self.urls, f"a full pass over stream {stream_id}'s shards")
                continue
            tally["draws"] += 1
            if (
                self.cfg.resampled
                and tally["draws"] > 3 * len(self.urls) + 10
                and (tally["raw"] == 0 or tally["decoded"] > 100)
            ):
                _check_alive(tally, skipped, self.urls, f"{tally['draws']} random shard draws")
            for sample in iter_raw_samples(url, skipped, self._damaged):
                tally["raw"] += 1
                buffer.append(sample)
                if len(buffer) > max(0, size - 1):
                    yield pick()
        while buffer:
            yield pick()

    def _decode(self, raw: dict, stream_id: int, raw_index: int) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"key": raw["__key__"], "caption": get_caption(raw, cfg.caption_key)}
        if cfg.load_images:
            image = decode_image(find_image(raw), min_side=cfg.resolution, max_pixels=cfg.max_image_pixels)
            if min(image.size) < cfg.min_image_side:
                raise SkipSample("too_small", f"{image.size}")
            # A crop RNG per sample: the same sample gets the same crop after a resume.
            rng = np.random.default_rng([self.seed, stream_id, 4, raw_index]) if self.crop == "random" else None
            out["image"] = resize_crop(image, cfg.resolution, self.crop, rng)
        if "img_emb" in raw:  # read from an embedding part
            out["img_emb"], out["text_emb"] = raw["img_emb"], raw["text_emb"]
        elif cfg.embeddings:  # joined to a tar sample by key
            if self._store is None:
                self._store = EmbeddingStore(cfg.embeddings)
            hit = self._store.lookup(out["key"])
            if hit is None:
                raise SkipSample("missing_embedding")
            out["img_emb"], out["text_emb"] = hit
        if "img_emb" in out and not (np.isfinite(out["img_emb"]).all() and np.isfinite(out["text_emb"]).all()):
            # one NaN row would poison the prior's normalization statistics and then every batch
            raise SkipSample("nonfinite_embedding")
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, n_workers = self._worker()
        by_sample = self.cfg.split == "samples"
        stream_id = worker if by_sample else self.rank * n_workers + worker
        n_streams = n_workers if by_sample else self.world_size * n_workers
        skip_to = self.start_positions.get(worker, 0)
        skipped: Counter = Counter()
        tally = {"good": 0, "decoded": 0, "raw": 0, "draws": 0}
        samples: list[dict] = []
        taken = 0
        for raw in self._raw(stream_id, n_streams, skipped, tally):
            taken += 1
            if taken <= skip_to:
                tally["good"] += 1  # replayed samples were usable or counted before; not a dead stream
                continue
            if by_sample and (taken - 1) // self.batch_size % self.world_size != self.rank:
                tally["good"] += 1  # another rank's sample
                continue
            if self.cfg.holdout_side and held_out(raw["__key__"], self.cfg.heldout_fraction) != (
                self.cfg.holdout_side == "heldout"
            ):
                tally["good"] += 1  # the other side of data.heldout=auto's split
                continue
            tally["decoded"] += 1
            try:
                samples.append(self._decode(raw, stream_id, taken))
                tally["good"] += 1
            except SkipSample as s:
                skipped[s.reason] += 1
                continue
            if len(samples) == self.batch_size:
                yield _collate(samples) | {"_position": (worker, taken), "_skipped": dict(skipped)}
                samples = []
                skipped.clear()  # the counter is shared with _raw: clear it, never rebind it
        if samples:
            yield _collate(samples) | {"_position": (worker, taken), "_skipped": dict(skipped)}
        elif skipped:
            yield {"_position": (worker, taken), "_skipped": dict(skipped), "_empty": True}


def _check_alive(tally: dict, skipped: Counter, urls: list[str], after: str) -> None:
    if tally["good"] == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "no samples at all"
        raise DataError(
            f"no usable sample after {after} ({len(urls)} shards, e.g. {urls[0]}); "
            f"skipped: {reasons}. Check data.shards and data.caption_key."
        )


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    if "image" in samples[0]:
        batch["image"] = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
    for name in ("img_emb", "text_emb"):
        if name in samples[0]:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return batch


# --- the rank's loader -----------------------------------------------------------------------------


def leave_signals_to_the_main_process(_worker_id: int) -> None:
    """Loader workers ignore the signals a cluster sends to a whole process group (SLURM at preemption
    and time limit, `timeout`, torchrun, Ctrl-C): the main process gets them too, and it saves and
    exits 75 (train/control.py); a worker dying of one would crash it with nothing saved. The workers
    still exit when the main process does (the DataLoader shuts them down, or they see it gone)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class ShardLoader:
    """Batches for one rank, with skip counters and a resumable position."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shards: str | None = None,
        repeat: bool = True,
        shuffle: bool = True,
        crop: str | None = None,
        num_workers: int | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not cfg.load_images and not cfg.embeddings:
            raise ValueError("data.load_images=false needs data.embeddings (a data.embed folder) to train from")
        self.cfg, self.batch_size = cfg, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.repeat, self.shuffle = repeat, shuffle
        self.crop = crop or cfg.crop
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        if cfg.split not in ("shards", "samples"):
            raise ValueError(f"data.split must be 'shards' or 'samples', got {cfg.split!r}")
        if cfg.load_images:
            self.urls = list_shards(shards or cfg.shards)
        else:  # each part of the embedding folder plays a shard: same splits, shuffles and positions
            self.urls = [f"{EMBEDDING_SCHEME}{cfg.embeddings}#{part}" for part in EmbeddingStore(cfg.embeddings).parts]
        streams = max(1, self.num_workers) * (world_size if cfg.split == "shards" else 1)
        if repeat and not cfg.resampled and len(self.urls) < streams:
            raise DataError(
                f"{len(self.urls)} shards cannot feed {streams} streams ({world_size} ranks x "
                f"{max(1, self.num_workers)} workers, split by {cfg.split}) without resampling (some would get "
                "none and the job would hang). Set data.resampled=true, lower data.num_workers, or write "
                "more, smaller shards (python -m data.shards --samples-per-shard ...)."
            )
        self.skipped: Counter = Counter()
        self.positions: dict[int, int] = {}
        self.batches = 0

    def _dataset(self) -> ShardStream:
        n = max(1, self.num_workers)
        return ShardStream(
            self.urls,
            self.cfg,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            repeat=self.repeat,
            shuffle=self.shuffle,
            crop=self.crop,
            start_positions=dict(self.positions),
            worker_offset=self.batches % n,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.num_workers
        loader = DataLoader(
            self._dataset(),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed),  # leave the global torch RNG untouched
            worker_init_fn=leave_signals_to_the_main_process if workers > 0 else None,
        )
        produced = 0
        for batch in loader:
            worker, taken = batch.pop("_position")
            self.skipped.update(batch.pop("_skipped"))
            # Physical worker ids rotate on resume; positions are kept by logical worker.
            self.positions[worker] = taken
            if batch.pop("_empty", False):
                continue
            self.batches += 1
            produced += 1
            yield batch
        if produced == 0 and self.batches == 0:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "no samples at all"
            raise DataError(
                f"the shard set yielded no sample ({len(self.urls)} shards, e.g. {self.urls[0]}); skipped: {reasons}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "positions": {str(k): v for k, v in self.positions.items()},
            "batches": self.batches,
            "skipped": dict(self.skipped),
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "urls": len(self.urls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore the position; returns False (and starts fresh streams) if the layout changed."""
        self.skipped = Counter(state.get("skipped", {}))
        layout = {
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "urls": len(self.urls),
        }
        if any(state.get(k) != v for k, v in layout.items()):
            self.reseed(int(state.get("batches", 0)))
            return False
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self.batches = int(state["batches"])
        return True

    def rewind(self) -> None:
        """Start again from the first batch (the same held-out batches at every validation)."""
        self.positions, self.batches = {}, 0

    def reseed(self, offset: int) -> None:
        """New streams that do not replay the old ones: for a resume at another world size."""
        self.seed = self.seed + 1_000_003 * (1 + offset)
        self.positions, self.batches = {}, 0
