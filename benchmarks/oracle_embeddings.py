"""What the decoder renders when its conditioning is perfect: the scene's true attributes in place of CLIP's.

    python -m benchmarks.oracle_embeddings write --shards datasets/demo/train --like datasets/demo/emb_train \\
        --out datasets/demo/oracle_train
    python -m benchmarks.oracle_embeddings write --shards datasets/demo/heldout --like datasets/demo/emb_heldout \\
        --out datasets/demo/oracle_heldout
    python -m train.decoder experiment=demo_decoder name=oracle-decoder task.prior=null \\
        data.embeddings=datasets/demo/oracle_train data.heldout_embeddings=datasets/demo/oracle_heldout
    python -m benchmarks.oracle_embeddings score --stack runs/demo --decoder runs/oracle-decoder/export --preset varied
    python -m benchmarks.oracle_embeddings stages --stack runs/demo --preset varied \\
        --oracle-decoder runs/oracle-decoder/export

`write` gives every scene of a one-object synthetic shard set an "embedding" that states what the scene is:
one-hot shape, color and background, the shape's radius, centre and turn (ORACLE_LAYOUT), in the layout of
an existing embedding folder (`--like`: its keys, captions, text embeddings and clip.json, so the decoder
trains on it as on the CLIP's). `score` decodes held-out scenes from their oracle embeddings and reads them
back with data.following: shape, color and background as captioned, and how far the drawn shape's centre
stands from the scene's. A decoder that cannot draw a scene from a perfect description will not draw it
from a CLIP's; this separates the CLIP's share of a failure (benchmarks.clip_probe) from the decoder's.
`stages` puts the shares side by side: the same held-out captions drawn by a stack's decoder from the CLIP
image embeddings of their real scenes and from its prior's samples, and by a no-layout oracle decoder from
the oracle embeddings (trained with `write --no-layout`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data.embeddings import EmbeddingStore, write_part
from data.following import by_shape_line, by_shape_text, centre, score, score_by_shape
from data.scenes import PALETTE, SHAPES
from data.shardfiles import iter_raw_samples, list_shards
from data.synthetic import PRESETS

WIDTH = 128  # the demo CLIP's embedding width; the rest of the vector is zero
# where each attribute sits in the oracle vector
ORACLE_LAYOUT = {"shape": 0, "color": len(SHAPES), "background": len(SHAPES) + len(PALETTE)}
_SCALARS = len(SHAPES) + 2 * len(PALETTE)  # radius, x, y, sin(turn), cos(turn) follow the one-hots
LEVELS = (999, 800, 600, 400, 200)  # the timesteps x0_by_noise_level reads the decoder's guess at


def oracle_vector(scene: dict, width: int = WIDTH, layout: bool = True) -> np.ndarray:
    """The oracle embedding of a one-object scene's JSON record (data.synthetic's `json`, Scene.to_json):
    each scalar scaled to about unit range, as the decoder normalizes the vector anyway. Without
    `layout`, the centre and the turn are left out (zero): what a caption fixes, not where the shape
    stands, so the decoder must choose the layout itself, as it does from a CLIP embedding."""
    if len(scene["objects"]) != 1:
        raise ValueError(f"oracle embeddings describe one-object scenes, this one has {len(scene['objects'])}")
    if width < _SCALARS + 5:
        raise ValueError(f"an oracle embedding needs {_SCALARS + 5} dimensions, the decoder's CLIP has {width}")
    obj = scene["objects"][0]
    v = np.zeros(width, np.float32)
    v[ORACLE_LAYOUT["shape"] + list(SHAPES).index(obj["shape"])] = 1
    v[ORACLE_LAYOUT["color"] + list(PALETTE).index(obj["color"])] = 1
    v[ORACLE_LAYOUT["background"] + list(PALETTE).index(scene["background"])] = 1
    turn = math.radians(obj.get("angle", 0.0))
    v[_SCALARS] = (obj["r"] - 0.24) * 10
    if layout:
        v[_SCALARS + 1 : _SCALARS + 3] = [(obj["x"] - 0.5) * 8, (obj["y"] - 0.5) * 8]
        v[_SCALARS + 3 : _SCALARS + 5] = [2 * math.sin(turn), math.cos(turn)]
    return v


def shard_records(shards: str) -> dict[str, dict]:
    """Every sample's JSON record in a shard spec (a folder, a brace pattern, ...), by key; read as the
    training loader reads shards (a damaged shard warns and gives what came before the damage)."""
    records, skipped = {}, Counter()
    for url in list_shards(shards):
        for sample in iter_raw_samples(url, skipped):
            if "json" in sample:
                records[sample["__key__"]] = json.loads(sample["json"])
    return records


def write(shards: str, like: str, out: str, layout: bool = True) -> int:
    """An oracle embedding folder for `shards`, row for row in the layout of the embedding folder `like`."""
    records, store, root = shard_records(shards), EmbeddingStore(like), Path(out)
    if root.exists():
        raise ValueError(f"{out} exists; remove it first")
    rows = 0
    for part in store.parts:
        data = store.load_part(part)
        missing = [k for k in data["key"] if k not in records]
        if missing:
            raise ValueError(f"{like} names samples {missing[:3]} that {shards} lacks")
        img = np.stack([oracle_vector(records[k], data["img_emb"].shape[1], layout) for k in data["key"]])
        write_part(root, part, list(data["key"]), list(data["caption"]), img, data["text_emb"])
        rows += len(img)
    if (Path(like) / "clip.json").exists():  # the decoder checks which CLIP its embeddings came from
        shutil.copy(Path(like) / "clip.json", root / "clip.json")
    return rows


def load(stack: str, decoder: str | None, preset: str, count: int, prior: bool = False):
    """(pipeline with `decoder` (None: the stack's own), the stack's CLIP and, with `prior`, its prior;
    the first `count` held-out scenes of `preset` at the decoder's size)."""
    from benchmarks.generation import scenes
    from unclip.pipeline import Pipeline
    from unclip.sample import find_stack

    paths = find_stack(stack) | ({"decoder": decoder} if decoder else {})
    for stage in ("up256", "up1024") if prior else ("prior", "up256", "up1024"):
        paths.pop(stage, None)
    pipe = Pipeline.from_exports(**paths, precision="fp32", progress=False)
    return pipe, scenes(preset, count, pipe.decoder.image_size)


def oracle_embeds(pipe, samples, layout: bool = True) -> torch.Tensor:
    """The scenes' oracle embeddings, as wide as the decoder's CLIP embedding."""
    width = pipe.decoder.clip_dim
    return torch.from_numpy(np.stack([oracle_vector(scene.to_json(), width, layout) for _, scene in samples]))


# score's sampler: deterministic, so a decoder's figures differ only by what it was trained on
DETERMINISTIC = {"decoder_sampler": "ddim", "decoder_eta": 0.0}


def score_decoder(pipe, samples, embeds, guidance: float | None = None, sampling: dict | None = None) -> dict:
    """The scenes decoded (at `guidance`, or the decoder's own scale; with the SampleSettings of `sampling`,
    DDIM at eta 0 on the decoder's own steps by default) from `embeds` (None: the prior's samples from their
    captions), read back, with how far each drawn shape stands from its scene's."""
    from unclip.images import to_pil
    from unclip.pipeline import SampleSettings

    sampling = DETERMINISTIC if sampling is None else sampling
    settings = SampleSettings(stop_at=pipe.decoder.image_size, decoder_guidance=guidance, **sampling)
    captions = [scene.caption for _, scene in samples]
    drawn = to_pil(pipe._generate(settings, list(range(len(samples))), captions=captions, embeds=embeds))
    result = score(drawn, captions) | {"by_shape": score_by_shape(drawn, captions)}
    pairs = [(centre(a), centre(b)) for a, (b, _) in zip(drawn, samples)]
    errors = [math.dist(a, b) for a, b in pairs if a and b]
    return result | {"centre_error": float(np.mean(errors)) if errors else None}


def stages(
    stack: str, preset: str, count: int, guidance: float | None, oracle_decoder: str | None, sampling: dict
) -> dict:
    """Where a stack loses its shapes: the same held-out captions drawn by its decoder from the CLIP image
    embeddings of their real scenes (what the CLIP keeps) and from the prior's samples for the captions
    (what the prior adds to that), and with `oracle_decoder`, a decoder trained on no-layout oracle
    embeddings, from theirs (what the decoder could draw told exactly what the caption says). `sampling`:
    SampleSettings for every row (a setting left out: each decoder's own)."""
    pipe, samples = load(stack, None, preset, count, prior=True)
    with torch.no_grad():
        clip_embeds = torch.cat([pipe.embed_image(image) for image, _ in samples])
    rows = {
        "the CLIP image embeddings of the real scenes": score_decoder(pipe, samples, clip_embeds, guidance, sampling),
        "the prior's samples for their captions": score_decoder(pipe, samples, None, guidance, sampling),
    }
    if oracle_decoder:
        pipe, samples = load(stack, oracle_decoder, preset, count)
        embeds = oracle_embeds(pipe, samples, layout=False)
        oracle_row = score_decoder(pipe, samples, embeds, guidance, sampling)
        rows["their no-layout oracle embeddings (--oracle-decoder)"] = oracle_row
    return rows


@torch.no_grad()
def x0_by_noise_level(pipe, samples, embeds, timesteps=LEVELS) -> dict[int, dict]:
    """At each timestep, the decoder's one-step x0 prediction from the scenes noised to it (unguided),
    read back: where along the noise levels the decoder can tell the shape from its conditioning alone
    (t = 999, nearly pure noise) and where from what the noisy image already shows (small t)."""
    from unclip.images import load_image, to_pil, to_uint8

    decoder = pipe.decoder
    x0 = torch.cat([load_image(image) for image, _ in samples])
    generator = torch.Generator().manual_seed(0)
    out = {}
    for t in timesteps:
        i = torch.full((len(x0),), t)
        x_t = decoder.diffusion.q_sample(x0, i, torch.randn(x0.shape, generator=generator))
        pred, _ = decoder.diffusion.split(decoder(x_t, i.float(), embeds).float())
        guess = decoder.diffusion.x0_from(pred, x_t, i).clamp(-1, 1)
        out[t] = score(to_pil(to_uint8(guess)), [scene.caption for _, scene in samples])
        out[t]["x0_mse"] = float(((guess - x0) ** 2).mean())
    return out


def _print_stages(args) -> None:
    sampling = {"decoder_sampler": args.sampler, "decoder_steps": args.steps}
    rows = stages(args.stack, args.preset, args.scenes, args.guidance, args.oracle_decoder, sampling)
    scale = f"guidance {args.guidance:g}" if args.guidance is not None else "its own guidance"
    how = f"{args.sampler or 'its own sampler'}, {args.steps or 'its own'} steps, {scale}"
    print(f"{args.scenes} held-out {args.preset} captions, drawn by {args.stack}'s decoder ({how}) from:")
    print("| conditioning | shape | color | background | by shape |\n|---|---:|---:|---:|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['shape']:.0%} | {r['color']:.0%} | {r['background']:.0%} | {by_shape_text(r['by_shape'])} |"
        )


def _print_score(args) -> None:
    t = time.perf_counter()
    pipe, samples = load(args.stack, args.decoder, args.preset, args.scenes)
    embeds = oracle_embeds(pipe, samples, args.layout)
    for guidance in args.guidance or [None]:
        r = score_decoder(pipe, samples, embeds, guidance)
        scale = f" at guidance {guidance:g}" if guidance is not None else ""
        print(
            f"{r['images']} held-out {args.preset} scenes drawn from their oracle embeddings{scale}: shape "
            f"{r['shape']:.0%}, color {r['color']:.0%}, background {r['background']:.0%}, all three {r['all']:.0%}; "
            f"the shape's centre {r['centre_error']:.3f} of the side from the scene's ({time.perf_counter() - t:.0f} s)"
        )
        print(by_shape_line(r["by_shape"]))
        t = time.perf_counter()
    print("\nthe decoder's x0 guess in one step from the scene noised to t:")
    print("| t | shape | color | background | x0 MSE |\n|---:|---:|---:|---:|---:|")
    for level, row in x0_by_noise_level(pipe, samples, embeds).items():
        print(f"| {level} | {row['shape']:.0%} | {row['color']:.0%} | {row['background']:.0%} | {row['x0_mse']:.4f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.oracle_embeddings", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="an oracle embedding folder for a one-object synthetic shard set")
    w.add_argument("--shards", required=True, help="the shard folder (data.synthetic's output)")
    w.add_argument("--like", required=True, help="data.embed's folder for those shards: its rows, captions, clip.json")
    w.add_argument("--out", required=True)
    s = sub.add_parser("score", help="decode held-out scenes from their oracle embeddings and read them back")
    s.add_argument("--decoder", required=True, help="a decoder export trained on oracle embeddings")
    s.add_argument(
        "--guidance", type=float, nargs="+", help="decoder guidance scales to draw at, a result each (default: its own)"
    )
    g = sub.add_parser("stages", help="a stack's shapes drawn from real scenes' CLIP embeddings, from its prior, ...")
    g.add_argument("--guidance", type=float, help="the decoder's guidance scale (default: its own)")
    g.add_argument("--oracle-decoder", help="a decoder export trained on no-layout oracle embeddings: a third row")
    g.add_argument("--sampler", choices=["ddim", "ddpm"], help="the decoders' sampler (default: each its own)")
    g.add_argument("--steps", help='the decoders\' sampling steps: "50", "ddim25" (default: each its own)')
    for sub_parser in (s, g):
        sub_parser.add_argument("--stack", required=True, help="the stack whose CLIP (and decoder, prior) to use")
        sub_parser.add_argument("--preset", default="varied", choices=list(PRESETS), help="whose held-out scenes")
        sub_parser.add_argument("--scenes", type=int, default=64, help="how many held-out scenes (the first N)")
    for sub_parser in (w, s):
        sub_parser.add_argument(
            "--no-layout",
            dest="layout",
            action="store_false",
            help="leave the centre and the turn out (as a caption does)",
        )
    args = p.parse_args(argv)
    if args.command == "write":
        print(f"{args.out}: {write(args.shards, args.like, args.out, args.layout)} oracle embeddings")
    elif args.command == "score":
        _print_score(args)
    else:
        _print_stages(args)


if __name__ == "__main__":
    main()
