"""Loader throughput: samples/s per worker, at 64 and 256 px.

    python -m benchmarks.loader                               # synthetic JPEG shards, 1 and 2 workers
    python -m benchmarks.loader --shards '/data/laion/{00000..00009}.tar' --workers 1 4 8

By default it writes synthetic shards whose images are twice the target side as JPEG (decode +
resize + crop is the work measured, as with real photos), then times full batches after a warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from data.loader import DataConfig, ShardLoader
from data.synthetic import write_synthetic


def measure(shards: str, resolution: int, workers: int, batch_size: int, num_batches: int) -> float:
    """Samples per second over `num_batches` batches, after the first few (worker start-up) are dropped."""
    cfg = DataConfig(
        shards=shards,
        resolution=resolution,
        crop="random",
        resampled=True,
        shuffle_buffer=256,
        num_workers=workers,
        pin_memory=False,
    )
    it = iter(ShardLoader(cfg, batch_size=batch_size, seed=0))
    for _ in range(max(2, workers * 2)):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="your shards (default: synthetic JPEG shards written to a temp folder)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-batches", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=2000, help="synthetic samples per resolution")
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions:
            shards = args.shards
            if shards is None:
                shards = str(Path(tmp) / f"r{res}")
                write_synthetic(
                    shards,
                    num_samples=args.num_samples,
                    resolution=2 * res,
                    image_format="jpg",
                    samples_per_shard=250,
                    workers=2,
                    progress=False,
                )
            for w in args.workers:
                rate = measure(shards, res, w, args.batch_size, args.num_batches)
                rows.append((res, w, rate, rate / max(1, w)))
    print(f"{'px':>5} {'workers':>8} {'samples/s':>10} {'per worker':>11}")
    for res, w, rate, per in rows:
        print(f"{res:>5} {w:>8} {rate:>10.0f} {per:>11.0f}")


if __name__ == "__main__":
    main()
