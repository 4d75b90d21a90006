"""Which SDPA kernel trains attention faster on this CPU, and what unclip.layers.attention's choice gives.

    python -m benchmarks.cpu_attention                 # kernels per shape, then the demo decoder's step

First, torch's flash and math kernels timed on the same inputs (bf16, a key mask as the decoder's
caption padding makes), forward alone and forward + backward, at the demo decoder's two attention
shapes and longer sequences: unclip.layers.attention takes the math kernel while training on a CPU
with at most CPU_MATH_ATTENTION_MAX_KEYS keys. Then a whole training step of the moved demo's decoder
(bf16 weights, batch 32, reading captions) with the choice as it is and with flash throughout,
alternating in one process so that the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from unclip import layers

# (batch, heads, queries, keys, head width): the demo decoder's 8x8 and 4x4 attention with 28 caption
# tokens, then longer sequences
SHAPES = ((32, 2, 64, 92, 32), (32, 3, 16, 44, 32), (16, 2, 128, 128, 32), (16, 4, 196, 196, 64), (8, 4, 256, 280, 64))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def kernel_ms(shape: tuple[int, ...], backend: SDPBackend, train: bool, repeats: int) -> float:
    b, h, nq, nk, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).bfloat16().requires_grad_(train) for n in (nq, nk, nk))
    mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    mask[:, :, :, :4] = False  # padded caption tokens

    def step():
        with sdpa_kernel(backend), torch.set_grad_enabled(train):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if train:
                out.float().sum().backward()

    return median_ms(step, repeats)


def decoder_step_fn(batch: int) -> Callable[[], None]:
    """One training step of the moved demo's decoder (experiment=demo_decoder as make demo
    DEMO_PRESET=moved sets it, bf16 weights), reading captions through the demo CLIP's architecture."""
    from dataclasses import replace

    from train.config import compose, to_object
    from unclip.clip import build_clip
    from unclip.decoder import Decoder

    moved = ["model.decoder.unet.spatial_embed_follows=true", "model.decoder.text_encoder=clip"]
    job = to_object(compose("decoder", ["experiment=demo_decoder", *moved]))
    torch.manual_seed(0)
    clip = build_clip(replace(job.model.clip, checkpoint=None)).eval()
    decoder = Decoder(job.model.decoder, clip.embed_dim, clip.text_width).bfloat16()
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    caption = decoder.caption_inputs(["a big red star on a blue background"] * batch, clip)
    caption["text_tokens"] = caption["text_tokens"].bfloat16()
    x, t = torch.randn(batch, 3, 64, 64).bfloat16(), torch.randint(0, 1000, (batch,))
    embed = torch.randn(batch, clip.embed_dim)

    def step():
        decoder(x, t, embed, **caption).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed calls per kernel and shape (median)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds of decoder steps per choice")
    p.add_argument("--batch", type=int, default=32, help="the decoder step's batch")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16")
    print("| batch, heads, queries, keys, width | pass | flash ms | math ms | attention() takes |")
    print("|---|---|---:|---:|---|")
    for shape in SHAPES:
        for train in (False, True):
            kernels = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
            flash, math_ = (kernel_ms(shape, kernel, train, args.repeats) for kernel in kernels)
            takes = "math" if train and shape[3] <= layers.CPU_MATH_ATTENTION_MAX_KEYS else "default (flash)"
            pass_ = "forward + backward" if train else "forward"
            print(f"| {', '.join(map(str, shape))} | {pass_} | {flash:.2f} | {math_:.2f} | {takes} |")
    step = decoder_step_fn(args.batch)
    chosen, limit = {"as chosen": [], "flash throughout": []}, layers.CPU_MATH_ATTENTION_MAX_KEYS
    for _ in range(args.rounds):
        for name, keys in (("as chosen", limit), ("flash throughout", 0)):
            layers.CPU_MATH_ATTENTION_MAX_KEYS = keys
            chosen[name].append(median_ms(step, 3))
    layers.CPU_MATH_ATTENTION_MAX_KEYS = limit
    ms = {name: statistics.median(v) for name, v in chosen.items()}
    print(f"\nmoved demo decoder training step, batch {args.batch}:")
    for name, value in ms.items():
        print(f"  {name}: {value:.1f} ms ({args.batch / value * 1000:.1f} images/s)")
    print(f"  speed-up of the choice: {ms['flash throughout'] / ms['as chosen']:.3f}x")


if __name__ == "__main__":
    main()
