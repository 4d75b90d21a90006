"""Images + captions -> img2dataset-layout shards (NNNNN.tar with KEY.jpg, KEY.txt, KEY.json).

    python -m data.shards --input photos/ --out shards/                    # photos/a.jpg + photos/a.txt
    python -m data.shards --input pairs.csv --out shards/ --image-column path --caption-column caption
    python -m data.shards --input pairs.parquet --out shards/ --resize 256 --resize-mode center_crop

Every image is opened and fully decoded before it is written, so a shard never holds an image the
decoder rejects (what libjpeg reports as a warning, e.g. garbled scan data, is not caught; see the
README's reliability table); images are stored under the extension of their real format, larger
than --max-side are downscaled, and captions that are not UTF-8 are skipped. What is skipped is
counted by reason, printed, and saved in OUT/_summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data.decode import MAX_IMAGE_PIXELS, SkipSample, check_size, decode_image, header_size
from data.writer import IMAGE_FORMATS, chunks, encode_image, json_bytes, run_shard_tasks, shard_name, write_shard

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
RESIZE_MODES = ("no", "keep_ratio", "center_crop")
DEFAULT_MAX_SIDE = 4096  # larger images are downscaled on write: what a 4x upsampler stage can still use
FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the loader reads as they are


@dataclass
class Pair:
    image: str  # path
    caption: str | None  # None: missing
    caption_error: str | None = None  # why the caption could not be read (skipped as bad_caption_encoding)


@dataclass
class ShardJob:
    path: str
    pairs: list[Pair]
    first_key: int
    resize: int | None
    resize_mode: str
    image_format: str
    quality: int
    max_side: int | None = DEFAULT_MAX_SIDE


def pairs_from_folder(folder: Path) -> list[Pair]:
    """Every image under `folder` (recursively) with the caption in its same-named .txt file."""
    pairs = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        txt = path.with_suffix(".txt")
        if not txt.exists():
            pairs.append(Pair(str(path), None))
            continue
        try:
            pairs.append(Pair(str(path), txt.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as e:
            pairs.append(Pair(str(path), None, f"{txt}: {e}"))
    return pairs


def pairs_from_table(table_path: Path, image_column: str, caption_column: str, image_root: Path | None) -> list[Pair]:
    """Rows of a CSV or parquet table; relative image paths are taken from `image_root` (default:
    the table's folder)."""
    if table_path.suffix.lower() == ".parquet":
        table = pq.read_table(table_path)
    else:
        table = pacsv.read_csv(table_path)
    for col in (image_column, caption_column):
        if col not in table.column_names:
            raise ValueError(f"{table_path} has no column {col!r}; columns: {table.column_names}")
    root = image_root or table_path.parent
    pairs = []
    for image, caption in zip(table.column(image_column).to_pylist(), table.column(caption_column).to_pylist()):
        path = Path(str(image)) if image is not None else None
        if path is not None and not path.is_absolute():
            path = root / path
        pairs.append(Pair(str(path) if path else "", None if caption is None else str(caption)))
    return pairs


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "no":
        return image
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)
    if mode == "center_crop":
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def _encode_pair(pair: Pair, job: ShardJob) -> dict[str, bytes]:
    if pair.caption_error:
        raise SkipSample("bad_caption_encoding", pair.caption_error)
    caption = (pair.caption or "").strip()
    if pair.caption is None:
        raise SkipSample("missing_caption")
    if not caption:
        raise SkipSample("empty_caption")
    path = Path(pair.image)
    if not pair.image or not path.is_file():
        raise SkipSample("missing_file")
    data = path.read_bytes()
    # the resize's cost from the header first: a tiny PNG can claim 100000x1, 12.8M x 128 once resized
    resized_side = job.resize if job.resize and job.resize_mode != "no" else None
    check_size(*header_size(data), resized_side, MAX_IMAGE_PIXELS)
    image = decode_image(data)  # raises SkipSample("corrupt_image" / "too_large"); converts any mode to RGB
    original = {"original_width": image.width, "original_height": image.height}
    suffix, rgb = _probe(data)  # the real format, whatever the file is called
    too_big = job.max_side and max(image.size) > job.max_side
    if job.resize or too_big or suffix != job.image_format or not rgb:
        image = _resize(image, job.resize, job.resize_mode) if job.resize else image
        if job.max_side and max(image.size) > job.max_side:
            image.thumbnail((job.max_side, job.max_side), Image.Resampling.LANCZOS)
        data, suffix = encode_image(image, job.image_format, job.quality), job.image_format
    meta = {"width": image.width, "height": image.height, "source": str(path), "caption": caption} | original
    return {suffix: data, "txt": caption.encode(), "json": json_bytes(meta)}


def _probe(data: bytes) -> tuple[str | None, bool]:
    """(the loader's extension for the bytes' real format, or None; whether they decode to 8-bit RGB).
    Original bytes are kept only in the requested format and already RGB (no CMYK, 16-bit, alpha)."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        return FORMAT_SUFFIX.get(im.format or ""), im.mode == "RGB"


def _write_job(job: ShardJob) -> tuple[int, Counter]:
    skipped: Counter = Counter()

    def samples():
        for i, pair in enumerate(job.pairs):
            try:
                files = _encode_pair(pair, job)
            except SkipSample as s:
                skipped[s.reason] += 1
                continue
            yield f"{job.first_key + i:09d}", files

    written = write_shard(Path(job.path), samples())
    return written, skipped


def write_shards(
    pairs: list[Pair],
    out: Path,
    *,
    samples_per_shard: int = 1000,
    resize: int | None = None,
    resize_mode: str = "keep_ratio",
    image_format: str = "jpg",
    quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> dict:
    """Write `pairs` as shards into `out`; returns the summary (written, skipped by reason)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    if not pairs:
        raise ValueError("no images found in the input")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ShardJob(str(out / shard_name(i)), pairs[a:b], a, resize, resize_mode, image_format, quality, max_side)
        for i, a, b in chunks(len(pairs), samples_per_shard)
    ]
    with tqdm(total=len(pairs), desc="shards", unit="img", disable=not progress) as bar:
        written, skipped = run_shard_tasks(jobs, _write_job, workers, bar.update)
    summary = {
        "input_samples": len(pairs),
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "shards": len(list(out.glob("*.tar"))),
    }
    (out / "_summary.json").write_text(json.dumps(summary, indent=2))
    if written == 0:
        raise ValueError(f"no sample could be written; skipped: {summary['skipped']}")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a folder of images with .txt captions, or a .csv / .parquet")
    p.add_argument("--out", required=True, help="output folder for NNNNN.tar shards")
    p.add_argument("--image-column", default="image", help="table column with image paths")
    p.add_argument("--caption-column", default="caption", help="table column with captions")
    p.add_argument("--image-root", help="folder relative image paths in the table start from")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--resize", type=int, help="resize on write: shorter side to this many pixels")
    p.add_argument("--resize-mode", default="keep_ratio", choices=RESIZE_MODES)
    p.add_argument("--format", dest="image_format", default="jpg", choices=list(IMAGE_FORMATS))
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality when re-encoding")
    p.add_argument("--workers", type=int, default=1, help="writer processes (one shard each at a time)")
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help=f"downscale images whose longer side is larger (default {DEFAULT_MAX_SIDE}; 0: keep every size)",
    )
    args = p.parse_args(argv)

    src = Path(args.input)
    try:
        if not src.exists():
            raise ValueError(f"--input {src} does not exist")
        if src.is_dir():
            pairs = pairs_from_folder(src)
        elif src.suffix.lower() in (".csv", ".parquet"):
            pairs = pairs_from_table(
                src, args.image_column, args.caption_column, Path(args.image_root) if args.image_root else None
            )
        else:
            raise ValueError(f"--input {src} is neither a folder nor a .csv / .parquet file")
        summary = write_shards(
            pairs,
            Path(args.out),
            samples_per_shard=args.samples_per_shard,
            resize=args.resize,
            resize_mode=args.resize_mode,
            image_format=args.image_format,
            quality=args.quality,
            workers=args.workers,
            max_side=args.max_side or None,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(
        f"wrote {summary['written']} of {summary['input_samples']} samples into {summary['shards']} shards "
        f"in {args.out}"
    )
    for reason, count in summary["skipped"].items():
        print(f"  skipped {count:>7}  {reason}")


if __name__ == "__main__":
    main()
