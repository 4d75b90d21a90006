"""The README's three pictures of the range demo, from the samples of a `make demo DEMO_PRESET=moved` run.

    python -m benchmarks.demo_pictures samples/demo --out docs

- `moved_candidates.png`: the contact sheets (`text/*/sheet.png`) of four held-out captions, stacked;
- `moved_interpolation.png`: the interpolation strip (`interpolate-from-to-*/sheet.png`);
- `moved_variations.png`: the demo's scene, then its variations from the inverted latent
  (`variations-scene-*/sheet.png`) above the same scene and its variations from fresh noise
  (`fresh-noise/variations-scene-*/sheet.png`).

Each sheet is found by its folder's name (`unclip.sample`'s slug and hash of the prompt), so a missing
or doubled folder is an error rather than a silently different picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from unclip.sample import short_hash, slug

# The captions the README's candidates picture shows: held-out captions of the demo's 16 (make demo's
# data.prompts), one of each shape, a big one whose shape has little room to move and three that have more
CANDIDATE_CAPTIONS = (
    "a big yellow star on a purple background",
    "a yellow circle on a green background",
    "a red square on a black background",
    "a green triangle on an orange background",
)
CANDIDATES_WIDTH = 560
INTERPOLATION_WIDTH = 928
VARIATIONS_ROW_HEIGHT = 176
MARGIN = 8


def find_sheet(root: Path, pattern: str) -> Path:
    """The one `sheet.png` in the folder of `root` that `pattern` (a glob of folder names) matches."""
    matches = sorted(root.glob(f"{pattern}/sheet.png"))
    if len(matches) != 1:
        found = ", ".join(str(m.parent.name) for m in matches) or "none"
        raise FileNotFoundError(f"expected one {root}/{pattern}/sheet.png, found {found}")
    return matches[0]


def scaled(image: Image.Image, *, width: int | None = None, height: int | None = None) -> Image.Image:
    """`image` in RGB, scaled to the given width or height with its aspect ratio kept."""
    factor = width / image.width if width else height / image.height
    size = (round(image.width * factor), round(image.height * factor))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def stacked(images: list[Image.Image]) -> Image.Image:
    """`images` one above the other, left-aligned on white."""
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def candidates_picture(samples: Path, captions=CANDIDATE_CAPTIONS) -> Image.Image:
    sheets = [Image.open(find_sheet(samples / "text", f"*-{slug(c)}-{short_hash(c)}")) for c in captions]
    return stacked([scaled(s, width=CANDIDATES_WIDTH) for s in sheets])


def interpolation_picture(samples: Path) -> Image.Image:
    return scaled(Image.open(find_sheet(samples, "interpolate-from-to-*")), width=INTERPOLATION_WIDTH)


def variations_row(scene: Image.Image, sheet: Image.Image) -> Image.Image:
    """The input scene, square, left of its variations' sheet, both VARIATIONS_ROW_HEIGHT high."""
    side = VARIATIONS_ROW_HEIGHT - 2 * MARGIN
    sheet = scaled(sheet, height=VARIATIONS_ROW_HEIGHT)
    row = Image.new("RGB", (side + MARGIN + sheet.width, VARIATIONS_ROW_HEIGHT), "white")
    row.paste(scene.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (0, MARGIN))
    row.paste(sheet, (side + MARGIN, 0))
    return row


def variations_picture(samples: Path) -> Image.Image:
    scene = Image.open(samples / "scene.png")
    inverted = Image.open(find_sheet(samples, "variations-scene-*"))
    fresh_noise = Image.open(find_sheet(samples / "fresh-noise", "variations-scene-*"))
    return stacked([variations_row(scene, inverted), variations_row(scene, fresh_noise)])


def write_pictures(samples: Path, out: Path) -> list[Path]:
    pictures = {
        "moved_candidates.png": candidates_picture(samples),
        "moved_interpolation.png": interpolation_picture(samples),
        "moved_variations.png": variations_picture(samples),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, picture in pictures.items():
        picture.save(out / name, optimize=True)
    return [out / name for name in pictures]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="the demo's samples folder (make demo's samples/demo)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the pictures go (default: docs)")
    args = parser.parse_args(argv)
    for path in write_pictures(args.samples, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
