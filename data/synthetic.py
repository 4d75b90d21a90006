"""Write the synthetic data set as shards.

    python -m data.synthetic --out datasets/synthetic/train --split train --num-samples 10000 --resolution 64
    python -m data.synthetic --out datasets/synthetic/heldout --split heldout --num-samples 1000 \\
        --resolution 64 --contact-sheet heldout.png

Sample i of a split depends only on (seed, split, i): any number of writer processes, any shard size
and any resolution give the same scenes. A rerun with the same arguments skips finished shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data.scenes import PALETTE, SHAPES, SIZES, SPLITS, SceneConfig, make_sample
from data.writer import IMAGE_FORMATS, chunks, encode_image, json_bytes, run_shard_tasks, shard_name, write_shard

MANIFEST = "_synthetic.json"
# "simple" is what the CPU demo trains on: one centred shape per scene, eight colors, four shapes, two sizes.
PRESETS: dict[str, SceneConfig] = {
    "full": SceneConfig(),
    "simple": SceneConfig(
        colors=["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
        backgrounds=["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
        shapes=["circle", "square", "triangle", "star"],
        sizes=["medium", "big"],
        max_objects=1,
        position_jitter=0.0,  # centred: the decoder can learn crisp shapes on a CPU in minutes
    ),
}
# "varied": simple's vocabulary, the shape moved and turned, so a caption leaves room (its candidates can
# differ in layout, variations and interpolations have something to show). `make demo DEMO_PRESET=varied`
# trains on it; the tiny decoder does not learn its shapes within the demo's budget yet (README).
PRESETS["varied"] = SceneConfig(**vars(PRESETS["simple"]) | {"position_jitter": 0.5, "rotation": 30.0})
# "moved": simple's shapes moved but upright, their centres on a 16-step grid (the tiny decoder's 4-pixel
# cells at 64 px): the tiny decoder draws them from a description far more often than turned ones
# (docs/GENERATION.md). `make demo DEMO_PRESET=moved` trains on it.
PRESETS["moved"] = SceneConfig(**vars(PRESETS["simple"]) | {"position_jitter": 0.5, "position_grid": 16})


@dataclass
class ShardTask:
    path: str
    seed: int
    split: str
    start: int
    stop: int
    resolution: int
    image_format: str
    scene: SceneConfig


def _write_task(task: ShardTask) -> tuple[int, Counter]:
    def samples():
        for i in range(task.start, task.stop):
            image, scene = make_sample(task.seed, task.split, i, task.resolution, task.scene)
            meta = {
                "width": task.resolution,
                "height": task.resolution,
                "source": "synthetic",
                "split": task.split,
                "index": i,
                "seed": task.seed,
                "caption": scene.caption,
            } | scene.to_json()
            yield (
                f"{i:09d}",
                {
                    task.image_format: encode_image(image, task.image_format),
                    "txt": scene.caption.encode(),
                    "json": json_bytes(meta),
                },
            )

    return write_shard(Path(task.path), samples()), Counter()


def write_synthetic(
    out: str | Path,
    *,
    split: str = "train",
    num_samples: int = 10_000,
    resolution: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    scene: SceneConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `num_samples` scenes of `split` into `out`/NNNNN.tar; returns `out`."""
    scene = scene or SceneConfig()
    scene.validate()
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} not supported; choose from {list(IMAGE_FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "split": split,
        "num_samples": num_samples,
        "resolution": resolution,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "scene": asdict(scene),
    }
    _check_manifest(out, manifest, overwrite)
    tasks = [
        ShardTask(str(out / shard_name(i)), seed, split, start, stop, resolution, image_format, scene)
        for i, start, stop in chunks(num_samples, samples_per_shard)
        if overwrite or not (out / shard_name(i)).exists()
    ]
    todo = sum(t.stop - t.start for t in tasks)
    with tqdm(total=todo, desc=f"synthetic {split} {resolution}px", unit="img", disable=not progress) as bar:
        run_shard_tasks(tasks, _write_task, workers, bar.update)
    return out


def _check_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    """Refuse to mix two sets in one folder; the manifest is written first, so a killed run resumes."""
    path = out / MANIFEST
    existing = list(out.glob("*.tar"))
    if overwrite:
        for stale in existing:
            stale.unlink()
    elif path.exists():
        old = _read_manifest(path)
        if old != manifest:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise ValueError(
                f"{out} already holds a synthetic set written with other settings ({', '.join(diff)} differ). "
                "Choose another --out, or pass --overwrite to replace it."
            )
    elif existing:
        raise ValueError(
            f"{out} holds shards that data.synthetic did not write; choose another --out or pass --overwrite"
        )
    path.write_text(json.dumps(manifest, indent=2))


def _read_manifest(path: Path) -> dict:
    manifest = json.loads(path.read_text())
    # a set written before a scene option existed was drawn as that option's default draws it
    manifest["scene"] = asdict(SceneConfig()) | manifest.get("scene", {})
    return manifest


def scene_config_of(folder: str | Path) -> SceneConfig:
    """How the scenes of a synthetic shard folder were drawn (its manifest's scene settings)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ValueError(f"{folder} holds no {MANIFEST}: not a shard folder data.synthetic wrote")
    scene = _read_manifest(path)["scene"]
    unknown = sorted(set(scene) - set(asdict(SceneConfig())))
    if unknown:
        raise ValueError(f"{path} names scene settings this data.synthetic does not know: {', '.join(unknown)}")
    return SceneConfig(**scene)


def split_captions(count: int, *, split: str = "heldout", seed: int = 0, scene: SceneConfig | None = None) -> list[str]:
    """The first `count` distinct captions of a split, in sample order (no image is drawn): prompts
    for generating what the held-out set describes."""
    from data.scenes import sample_scene, scene_rng

    scene = scene or SceneConfig()
    scene.validate()
    captions: list[str] = []
    for i in range(1_000 * count):
        caption = sample_scene(scene_rng(seed, split, i), scene).caption
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    raise ValueError(f"the {split} split has fewer than {count} distinct captions with these scene settings")


def read_contact_sheet_samples(shard_dir: Path, count: int) -> tuple[list, list[str]]:
    """The first `count` images and captions of a shard folder, decoded with the real loader path."""
    from data.decode import decode_image
    from data.loader import iter_raw_samples, list_shards

    images, captions = [], []
    for url in list_shards(str(shard_dir)):
        for raw in iter_raw_samples(url, Counter()):
            ext = next((e for e in IMAGE_FORMATS if e in raw), None)
            if ext is None or "txt" not in raw:
                continue
            images.append(decode_image(raw[ext]))
            captions.append(raw["txt"].decode())
            if len(images) >= count:
                return images, captions
    return images, captions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder for NNNNN.tar shards")
    p.add_argument("--split", default="train", choices=list(SPLITS))
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (64, 256, 1024, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--format", dest="image_format", default="png", choices=list(IMAGE_FORMATS))
    p.add_argument("--preset", default="full", choices=list(PRESETS), help="scene vocabulary preset")
    p.add_argument("--colors", nargs="+", choices=list(PALETTE), help="shape colors (default: the preset's)")
    p.add_argument("--backgrounds", nargs="+", choices=list(PALETTE), help="background colors")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    p.add_argument("--sizes", nargs="+", choices=list(SIZES))
    p.add_argument("--max-objects", type=int, choices=(1, 2))
    p.add_argument("--workers", type=int, default=1, help="writer processes (one shard each at a time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set in --out")
    p.add_argument("--contact-sheet", help="also write a captioned grid of the first samples to this PNG")
    p.add_argument("--contact-sheet-count", type=int, default=32)
    p.add_argument("--prompts-out", help="write the split's first distinct captions to this file instead (no images)")
    p.add_argument("--prompts-count", type=int, default=16, help="how many captions --prompts-out writes")
    args = p.parse_args(argv)

    scene = SceneConfig(**asdict(PRESETS[args.preset]))
    for name in ("colors", "backgrounds", "shapes", "sizes", "max_objects"):
        if getattr(args, name) is not None:
            setattr(scene, name, getattr(args, name))
    if args.prompts_out:
        captions = split_captions(args.prompts_count, split=args.split, seed=args.seed, scene=scene)
        Path(args.prompts_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.prompts_out).write_text("\n".join(captions) + "\n")
        print(f"wrote {len(captions)} {args.split} captions to {args.prompts_out}")
        return
    if not args.out:
        p.error("--out is required (unless --prompts-out)")
    try:
        out = write_synthetic(
            args.out,
            split=args.split,
            num_samples=args.num_samples,
            resolution=args.resolution,
            seed=args.seed,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            scene=scene,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    n_shards = len(list(out.glob("*.tar")))
    print(f"wrote {args.num_samples} {args.split} samples at {args.resolution}px: {out}/ ({n_shards} shards)")
    if args.contact_sheet:
        from unclip.grid import captioned_grid

        images, captions = read_contact_sheet_samples(out, args.contact_sheet_count)
        sheet = captioned_grid(images, captions)
        Path(args.contact_sheet).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.contact_sheet)
        print(f"contact sheet of {len(images)} samples: {args.contact_sheet}")


if __name__ == "__main__":
    main()
