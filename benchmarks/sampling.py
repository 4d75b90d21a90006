"""Sampling speed of a stack: images/s of text-to-image at each output size, per precision and layout.

    python -m benchmarks.sampling --stack runs/demo                   # what make demo generates with
    python -m benchmarks.sampling --stack runs/ --images 64 --batch-size 32 --device cuda

Each configuration generates the same captions with the same seeds through unclip.pipeline, once to
warm up and once timed, stopping after the decoder (the caption -> 64 px part) and after every
upsampler; an upsampler's cost is the difference. Steps are each export's own unless given.
"""

from __future__ import annotations

import argparse
import time

import torch

from unclip.pipeline import Pipeline, SampleSettings
from unclip.sample import find_stack

CONFIGS = (("fp32", False), ("bf16", False), ("bf16", True))  # (precision, channels_last upsamplers)


def time_stack(pipe: Pipeline, captions: list[str], stop_at: int, settings: dict) -> float:
    """Seconds to make one image per caption up to `stop_at` pixels (after one warm-up batch)."""
    pipe.text_to_image(captions[: settings["batch_size"]], 1, stop_at=stop_at, **settings)
    start = time.perf_counter()
    pipe.text_to_image(captions, 1, stop_at=stop_at, **settings)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", required=True, help="a runs folder or run-name prefix (as unclip.sample --stack)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--decoder-steps", default=None)
    p.add_argument("--up256-steps", default=None)
    args = p.parse_args(argv)
    paths = find_stack(args.stack)
    captions = [f"a big {c} star on a white background" for c in ("red", "blue", "green", "black")]
    captions = (captions * args.images)[: args.images]
    settings = {"batch_size": args.batch_size, "decoder_steps": args.decoder_steps, "up256_steps": args.up256_steps}
    threads = torch.get_num_threads()
    print(f"{args.images} images, batch {args.batch_size}, torch {torch.__version__}, {threads} threads")
    print("| precision | upsampler layout | stage | steps | s | images/s |")
    print("|---|---|---|---|---:|---:|")
    for precision, channels_last in CONFIGS:
        pipe = Pipeline.from_exports(
            **paths, device=args.device, precision=precision, progress=False, channels_last=channels_last
        )
        layout = "channels_last" if channels_last else "NCHW"
        pipe_settings = _settings(settings)
        stages = pipe.resolve(SampleSettings(**pipe_settings))
        before = 0.0
        for name in pipe.stages():
            size = pipe.output_size() if name == pipe.stages()[-1] else _size(pipe, name)
            total = time_stack(pipe, captions, size, pipe_settings)
            own = total - before
            label = "prior + decoder" if name == "decoder" else name
            rate = args.images / own
            print(f"| {precision} | {layout} | {label} | {stages[name]['steps']} | {own:.1f} | {rate:.1f} |")
            before = total


def _settings(given: dict) -> dict:
    return {k: v for k, v in given.items() if v is not None}


def _size(pipe: Pipeline, stage: str) -> int:
    return pipe.decoder.image_size if stage == "decoder" else pipe.upsamplers[stage].cfg.target_size


if __name__ == "__main__":
    main()
