"""How faithfully a stack's editing modes work, measured on held-out synthetic scenes.

    python -m benchmarks.generation --stack runs/demo                 # what docs/GENERATION.md reports

Three tables, each over the same held-out scenes of the preset the stack was trained on (64 px, the
decoder's size: the upsamplers do not take part):

- inversion: the decoder's DDIM inversion of a scene given its CLIP embedding, decoded again with
  DDIM at eta 0 (what variations, interpolations and text diffs start from), as PSNR against the scene;
  next to it the same embedding decoded from fresh noise, what the modes did before inversion.
- variations: for each DDIM eta, the fraction of variations that still show the scene's shape, color and
  background (content kept), how far their shape stands from the scene's (layout moved) and from each
  other's (spread), as fractions of the side (data.following reads them).
- inpainting: the centre of each scene repainted with a prompt naming another shape and color on the
  scene's background, with RePaint resampling off (jump_n_sample 1) and on (10, the RePaint paper's,
  with its jump length of 10 steps and a shorter one, since our 25 DDIM steps are not its 250):
  the fraction of fills that show what the prompt names, and the seam (mean absolute step across the
  mask's edge, /255) next to the step the scene itself has there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from data.following import centre, parse_caption, read_scene, spread
from data.scenes import PALETTE, SHAPES, SceneConfig, make_sample
from data.synthetic import PRESETS
from unclip.images import box_mask
from unclip.pipeline import Pipeline, SampleSettings
from unclip.sample import find_stack

ETAS = (0.0, 0.3, 0.6, 1.0)
JUMPS = ((1, 10), (10, 10), (10, 3))  # (jump_n_sample, jump_length): off, RePaint's, shorter jumps


def scenes(preset: str, count: int, size: int):
    """The first `count` held-out scenes of `preset` (as data.synthetic writes them) at `size` px."""
    return [make_sample(0, "heldout", i, size, PRESETS[preset]) for i in range(count)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def inversion(pipe: Pipeline, samples, s: SampleSettings) -> dict[str, float]:
    inverted, fresh = [], []
    for image, _ in samples:
        embed = pipe.embed_image(image)
        latent = pipe.invert(image, embed, s)
        again = pipe._generate(s, [s.seed], embeds=embed, latents=latent)[0]
        noise = pipe._generate(s, [s.seed], embeds=embed)[0]
        inverted.append(psnr(again, pixels(image)))
        fresh.append(psnr(noise, pixels(image)))
    return {"inverted": float(np.mean(inverted)), "worst": float(np.min(inverted)), "fresh": float(np.mean(fresh))}


def variations(pipe: Pipeline, samples, s: SampleSettings, eta: float | None, n: int) -> dict[str, float]:
    kept, moved, spreads = [], [], []
    for image, _ in samples:
        truth, where = read_scene(image), centre(image)
        start = "noise" if eta is None else "inverted"
        out = pipe.variations(image, n, settings=s, start=start, decoder_eta=0.0 if eta is None else eta).images
        for v in out:
            kept.append(read_scene(v) == truth)
            c = centre(v)
            if c is not None and where is not None:
                moved.append(np.hypot(c[0] - where[0], c[1] - where[1]))
        spreads.append(spread(out) or 0.0)
    return {"kept": float(np.mean(kept)), "moved": float(np.mean(moved or [0.0])), "spread": float(np.mean(spreads))}


def inpainting(
    pipe: Pipeline, samples, s: SampleSettings, jumps: int, length: int, scene_cfg: SceneConfig
) -> dict[str, float]:
    followed, seams, real_seams = [], [], []
    for image, scene in samples:
        side = image.size[0]
        lo, hi = side // 4, side - side // 4
        prompt, shape, color = _other_prompt(scene, scene_cfg)
        keep = box_mask((side, side), (lo, lo, hi, hi))
        out = pipe.inpaint(image, keep, prompt, 1, settings=s, jump_n_sample=jumps, jump_length=length).images[0]
        fill = out.crop((lo, lo, hi, hi))
        reading = read_scene(fill, tuple(scene_cfg.shapes))
        followed.append(reading.color == color and reading.shape == shape)
        seams.append(_seam(pixels(out), lo, hi))
        real_seams.append(_seam(pixels(image), lo, hi))
    return {"followed": float(np.mean(followed)), "seam": float(np.mean(seams)), "real": float(np.mean(real_seams))}


def _other_prompt(scene, scene_cfg: SceneConfig) -> tuple[str, str, str]:
    """A prompt naming another shape and another color of the preset's than the scene's, on the scene's
    background."""
    truth = parse_caption(scene.caption)
    shapes = [x for x in scene_cfg.shapes if x != truth["shape"]] or list(SHAPES)
    colors = [c for c in scene_cfg.colors if c not in (truth["color"], truth["background"])] or list(PALETTE)
    i = sum(map(ord, scene.caption))  # a fixed pick per scene
    shape, color = shapes[i % len(shapes)], colors[i % len(colors)]
    # medium (unnamed in captions): a shape the centre box can hold whole, which a big one is not
    return f"a {color} {shape} on a {truth['background']} background", shape, color


def _seam(x: torch.Tensor, lo: int, hi: int) -> float:
    """Mean absolute step between each pixel just inside the box's edge and its neighbour just outside."""
    x = x.float()
    steps = [
        (x[:, lo:hi, lo] - x[:, lo:hi, lo - 1]).abs(),
        (x[:, lo:hi, hi - 1] - x[:, lo:hi, hi]).abs(),
        (x[:, lo, lo:hi] - x[:, lo - 1, lo:hi]).abs(),
        (x[:, hi - 1, lo:hi] - x[:, hi, lo:hi]).abs(),
    ]
    return float(torch.cat([t.flatten() for t in steps]).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", required=True, help="a runs folder or run-name prefix (as unclip.sample --stack)")
    p.add_argument(
        "--preset",
        default="simple",
        choices=list(PRESETS),
        help="the preset the stack was trained on (make demo: simple)",
    )
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--variations", type=int, default=4, help="variations per scene")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--decoder-guidance", type=float, default=None, help="default: the decoder export's")
    p.add_argument("--only", choices=["inversion", "variations", "inpainting"], action="append")
    args = p.parse_args(argv)
    pipe = Pipeline.from_exports(**find_stack(args.stack), device=args.device, precision=args.precision, progress=False)
    size = pipe.output_size(64)
    samples = scenes(args.preset, args.scenes, size)
    s = SampleSettings(stop_at=64, decoder_sampler="ddim", decoder_eta=0.0, decoder_guidance=args.decoder_guidance)
    only = set(args.only or ["inversion", "variations", "inpainting"])
    print(f"{args.scenes} held-out {args.preset} scenes at {size} px, {args.precision}, stack {args.stack}")
    if "inversion" in only:
        t = time.perf_counter()
        r = inversion(pipe, samples, s)
        print("\n| start | PSNR (dB) | worst scene |\n|---|---:|---:|")
        print(f"| inverted latent, DDIM eta 0 | {r['inverted']:.1f} | {r['worst']:.1f} |")
        print(f"| fresh noise, DDIM eta 0 | {r['fresh']:.1f} | |")
        print(f"({time.perf_counter() - t:.0f} s)")
    if "variations" in only:
        t = time.perf_counter()
        print("\n| start | eta | content kept | layout moved | spread |\n|---|---:|---:|---:|---:|")
        for eta in (*ETAS, None):
            r = variations(pipe, samples, s, eta, args.variations)
            label = "fresh noise" if eta is None else "inverted latent"
            print(
                f"| {label} | {0.0 if eta is None else eta} | {r['kept']:.0%} | {r['moved']:.2f} | {r['spread']:.2f} |"
            )
        print(f"({time.perf_counter() - t:.0f} s)")
    if "inpainting" in only:
        t = time.perf_counter()
        print("\n| jump_n_sample | jump_length | prompt followed | seam (/255) | the scene's own step there |")
        print("|---:|---:|---:|---:|---:|")
        for jumps, length in JUMPS:
            t_row = time.perf_counter()
            r = inpainting(pipe, samples, s, jumps, length, PRESETS[args.preset])
            row = f"| {jumps} | {length} | {r['followed']:.0%} | {r['seam']:.1f} | {r['real']:.1f} |"
            print(f"{row} ({time.perf_counter() - t_row:.0f} s)")
        print(f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
