"""Our decoder U-Net against the peer's (DALLE2-pytorch 1.15.6), at matched parameters, in one run.

    pip install --no-deps --target /opt/peer dalle2-pytorch==1.15.6 kornia kornia-rs einx frozendict loguru \\
        vector-quantize-pytorch torch-einops-utils resize-right rotary-embedding-torch x-clip coca-pytorch \\
        pytorch-warmup ema-pytorch            # its own folder: its pins never touch this environment
    python -m benchmarks.peer --peer-dir /opt/peer --size small             # a CPU: ~20M-parameter U-Nets
    python -m benchmarks.peer --peer-dir /opt/peer --size base --batch 64   # a GPU: our base64 (~320M)

Both U-Nets are built for the same job (64 px, a 768-d CLIP image embedding, 77 CLIP caption tokens
of width 768, learned variance: 6 output channels, channel multipliers 1,2,3,4, 3 residual blocks a
level, self-attention at the three lower levels), the peer's width chosen so its parameter count is
the closest to ours. Each trains the same way in the same process: forward, MSE on its output,
backward and a fused AdamW step, under the same precision, warm-up steps excluded. FLOPs per sample
are counted by torch.utils.flop_counter on one forward and backward of each, so the table shows the
ratio of throughput and of FLOP rate (the fairer one where the two do different amounts of work).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

from benchmarks.train_step import append_csv
from train.flops import count_flops, peak_flops_per_s
from unclip.unet import UNet, UNetConfig

SIZES = {"small": 64, "base": 192}  # our model_channels
CLIP_DIM, TEXT_WIDTH, TOKENS = 768, 768, 77
DEFAULT_CSV = Path(__file__).parent / "results" / "peer.csv"


def ours(channels: int) -> tuple[nn.Module, Callable]:
    cfg = UNetConfig(
        image_size=64,
        model_channels=channels,
        channel_mult=[1, 2, 3, 4],
        num_res_blocks=3,
        attention_resolutions=[32, 16, 8],
        num_head_channels=64,
        dropout=0.0,
        clip_dim=CLIP_DIM,
        text_width=TEXT_WIDTH,
    )
    net = UNet(cfg, learn_sigma=True)
    return net, lambda x, t, image, text: net(x, t.float(), image, text, _all_real(text))


def _all_real(text: torch.Tensor) -> torch.Tensor:
    """A caption mask with every token real, on the captions' device (the GPU run's crash was a CPU mask)."""
    return torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)


def peer(dim: int) -> tuple[nn.Module, Callable]:
    from dalle2_pytorch import Unet

    net = Unet(
        dim=dim,
        image_embed_dim=CLIP_DIM,
        text_embed_dim=TEXT_WIDTH,
        cond_dim=dim,
        channels=3,
        out_dim=6,
        dim_mults=(1, 2, 3, 4),
        num_resnet_blocks=3,
        self_attn=(False, True, True, True),
        cond_on_text_encodings=True,
        cond_on_image_embeds=True,
        max_text_len=TOKENS,
    )
    return net, lambda x, t, image, text: net(x, t, image_embed=image, text_encodings=text)


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def matched_peer_dim(target: int) -> int:
    """The peer width (a multiple of 16) whose parameter count is the closest to `target` (counted on
    the meta device: no weights are made, so the search takes seconds at any size)."""
    best = None
    for dim in range(32, 513, 16):
        with torch.device("meta"):
            n = count(peer(dim)[0])
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (dim, n)
        if n > target:
            break
    return best[0]


def inputs(batch: int, device: torch.device):
    return (
        torch.randn(batch, 3, 64, 64, device=device),
        torch.randint(0, 1000, (batch,), device=device),
        torch.randn(batch, CLIP_DIM, device=device),
        torch.randn(batch, TOKENS, TEXT_WIDTH, device=device),
    )


def train_rate(net: nn.Module, call: Callable, batch: int, steps: int, warmup: int, dtype, device) -> float:
    """Samples per second of forward + backward + AdamW, after `warmup` steps."""
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    data = inputs(batch, device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = call(*data)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def flops_per_sample(net: nn.Module, call: Callable, device) -> int:
    data = inputs(1, device)
    return count_flops(lambda: call(*data).float().sum().backward())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-dir", type=Path, required=True, help="where dalle2-pytorch was installed (--target)")
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="where the rows are appended")
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.peer_dir))
    try:
        import dalle2_pytorch
    except ImportError as e:
        raise SystemExit(f"error: DALLE2-pytorch does not import from {args.peer_dir}: {e}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    mine, my_call = ours(SIZES[args.size])
    theirs, their_call = peer(matched_peer_dim(count(mine)))
    rows = []
    for label, net, call in (
        ("unclip", mine, my_call),
        (f"DALLE2-pytorch {dalle2_pytorch.__version__}", theirs, their_call),
    ):
        flops = flops_per_sample(net.to(device), call, device)
        rate = train_rate(net, call, args.batch, args.steps, args.warmup, dtype, device)
        rows.append((label, count(net), flops, rate))
        net.cpu()
    peak = peak_flops_per_s(args.precision)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"{where}, {args.precision}, batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    print("| U-Net | parameters | GFLOP / sample | samples/s | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n, flops, rate in rows:
        mfu = f"{flops * rate / peak:.1%}" if peak else "-"
        print(f"| {label} | {n / 1e6:.1f}M | {flops / 1e9:.2f} | {rate:.1f} | {flops * rate / 1e12:.3f} | {mfu} |")
    (_, _, f0, r0), (_, _, f1, r1) = rows
    print(f"ours / peer: {r0 / r1:.2f}x samples/s, {f0 * r0 / (f1 * r1):.2f}x FLOP/s")
    for label, n, flops, rate in rows:
        append_csv(
            args.csv,
            {
                "date": date.today().isoformat(),
                "device": where,
                "model": label,
                "size": args.size,
                "precision": args.precision,
                "batch": args.batch,
                "parameters": n,
                "gflop_per_sample": round(flops / 1e9, 2),
                "samples_per_s": round(rate, 2),
                "mfu": round(flops * rate / peak, 4) if peak else None,
                "ratio": round(rate / r1, 3),  # ours / the peer's samples/s (1 on the peer's own row)
            },
        )


if __name__ == "__main__":
    main()
