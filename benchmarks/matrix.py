"""The GPU benchmark matrix of docs/PERFORMANCE.md, in one run: python -m benchmarks.matrix (benchmarks/gpu.sh).

Each row is one command of benchmarks/ run in a process of its own (a row that fails or runs out of
memory does not stop the others), in order of importance, under what is left of --budget-s: a row
whose estimate no longer fits is listed as not run. The training rows append to one CSV
(benchmarks/results/gpu_matrix.csv), the peer comparison to benchmarks/results/peer.csv, the memory
search to benchmarks/results/memory.csv; every table the commands print, with each row's command,
status and time, goes to one markdown file (benchmarks/results/gpu_matrix.md).

--tiny rehearses the same rows at tiny sizes on a CPU (minutes), so the script is known to run before
any GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    name: str
    argv: list[str]  # after `python -m`
    estimate_s: int  # on an H100/H200 (or the CPU for --tiny)


def beside(csv: Path, name: str) -> Path:
    """Another results CSV next to the matrix's, tagged as it is (the rehearsal's stay apart)."""
    return csv.with_name(name + csv.stem.removeprefix("gpu_matrix") + ".csv")


def peer_row(peer_dir: str, csv: Path, size: str, options: list[str], estimate_s: int) -> Row:
    """Our U-Net against the peer's; its rows go next to the matrix's CSV."""
    argv = [
        "benchmarks.peer",
        "--peer-dir",
        peer_dir,
        "--size",
        size,
        *options,
        "--csv",
        str(beside(csv, "peer")),
    ]
    return Row("peer", argv, estimate_s)


def rows(tiny: bool, csv: Path, peer_dir: str) -> list[Row]:
    """The matrix, most important first."""
    ts = ["benchmarks.train_step", "--csv", str(csv)]
    if tiny:  # Hydra overrides first, then the options: argparse takes positionals before options only
        steps = ["--steps", "4", "--warmup", "2", "--samples", "64"]
        return [
            peer_row(peer_dir, csv, "small", ["--batch", "2", "--steps", "2", "--warmup", "1"], 120),
            Row(
                "decoder levers",
                [
                    *ts,
                    "decoder",
                    "model/decoder=tiny",
                    "trainer.batch_per_gpu=8",
                    "precision=fp32",
                    "--steps",
                    "6",
                    "--warmup",
                    "2",
                    "--profile",
                    "2",
                    "--samples",
                    "64",
                    "--embeddings",
                    "--compare",
                    "trainer.channels_last=true",
                    "--compare",
                    "trainer.compile=true",
                    "trainer.compile_backend=aot_eager",
                    "trainer.compile_scope=norm_act",
                ],
                240,
            ),  # fmt: skip
            Row(
                "prior",
                [
                    *ts,
                    "prior",
                    "model/prior=tiny",
                    "trainer.batch_per_gpu=8",
                    *steps,
                    "--compare",
                    "model.prior.caption_padding=learned",
                ],
                120,
            ),  # fmt: skip
            Row(
                "memory",
                [
                    "benchmarks.memory",
                    "--measure",
                    "--presets",
                    "decoder tiny",
                    "--cpu-cap",
                    "2",
                    "--csv",
                    str(beside(csv, "memory")),
                ],
                60,
            ),  # fmt: skip
        ]
    dec = [
        "decoder",
        "model/decoder=base64",
        "model/clip=ViT-L-14",
        "trainer.batch_per_gpu=64",
        "precision=bf16_autocast",
    ]
    steps = ["--steps", "26", "--warmup", "6", "--samples", "2000"]
    short = ["--steps", "24", "--warmup", "6", "--samples", "2000"]
    profiled = ["--steps", "31", "--warmup", "6", "--profile", "5", "--samples", "2000"]  # where the step's time goes
    return [
        peer_row(peer_dir, csv, "base", ["--batch", "64", "--steps", "20"], 60),
        Row(
            "decoder from embeddings: precision, layout, padding, batch",
            [
                *ts,
                *dec,
                *profiled,
                "--embeddings",
                "--compare",
                "precision=bf16",
                "--compare",
                "trainer.channels_last=true",
                "--compare",
                "model.decoder.unet.caption_padding=learned",
                "--compare",
                "trainer.batch_per_gpu=128",
            ],
            330,  # the first training row: it also makes the shared scenes and embeddings
        ),  # fmt: skip
        Row(
            "prior paper_1b",
            [
                *ts,
                "prior",
                "model/prior=paper_1b",
                "model/clip=ViT-L-14",
                "precision=bf16_autocast",
                "trainer.batch_per_gpu=256",
                *short,
                "--embeddings",
                "--compare",
                "precision=bf16",
                "--compare",
                "model.prior.caption_padding=learned",
            ],
            120,
        ),  # fmt: skip
        Row(
            "upsampler paper256",
            [
                *ts,
                "upsampler",
                "model/upsampler=paper256",
                "stage=up256",
                "data.resolution=256",
                "precision=bf16_autocast",
                "trainer.batch_per_gpu=32",
                *short,
                "--compare",
                "precision=bf16",
                "--compare",
                "trainer.channels_last=true",
            ],
            90,
        ),  # fmt: skip
        Row(
            "paper decoder (3.5B with GLIDE text), one GPU",
            [
                *ts,
                "decoder",
                "experiment=paper_decoder",
                "trainer.batch_global=null",  # the experiment's 2048 = 64 micro-batches a step: time one
                "model/clip=ViT-L-14",
                "precision=bf16_autocast",
                "model.decoder.unet.checkpointing=true",
                "trainer.batch_per_gpu=32",
                "--steps",
                "10",
                "--warmup",
                "4",
                "--samples",
                "1000",
                "--embeddings",
            ],
            150,
        ),  # fmt: skip
        Row("decoder with the CLIP in the loop", [*ts, *dec, *short], 50),
        Row(
            "memory: largest micro-batch",
            [
                "benchmarks.memory",
                "--measure",
                "--presets",
                "decoder base64",
                "prior paper_1b",
                "upsampler paper256",
                "decoder paper64+glide",
                "--csv",
                str(beside(csv, "memory")),
            ],
            120,
        ),  # fmt: skip
        Row(
            "decoder compiled (compare with the first row of the decoder from embeddings)",
            [
                *ts,
                *dec,
                *short,
                "--embeddings",
                "trainer.compile=true",
                "trainer.compile_scope=model",
                "--compare",
                "trainer.compile_scope=norm_act",
            ],
            200,
        ),  # fmt: skip
    ]


def run_row(row: Row, timeout_s: float, workdir: Path) -> tuple[str, float, str]:
    """(status, seconds, the markdown table lines it printed). The training rows share `workdir`: the
    synthetic scenes, the random CLIP and its embeddings are made once for all of them."""
    started = time.time()
    argv = [*row.argv, "--workdir", str(workdir)] if row.argv[0] == "benchmarks.train_step" else row.argv
    try:
        done = subprocess.run(
            [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=max(30.0, timeout_s)
        )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        status, out, err = f"stopped at {timeout_s:.0f} s", _text(e.stdout), _text(e.stderr)
    lines = [line for line in out.splitlines() if line.startswith("|") or line.startswith("ratio") or " / " in line]
    if status != "ok":
        lines.append("```\n" + "\n".join(err.strip().splitlines()[-12:]) + "\n```")
    return status, time.time() - started, "\n".join(lines)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the rehearsal: tiny sizes, on a CPU")
    p.add_argument("--budget-s", type=float, default=360.0, help="stop starting rows after this long")
    p.add_argument("--peer-dir", default=".peer", help="where the peer's wheels were installed (--target)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--from", dest="first", type=int, default=0, help="start at this row (0-based): a second session")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_tiny" if args.tiny else ""
    csv, md = args.out / f"gpu_matrix{tag}.csv", args.out / f"gpu_matrix{tag}.md"
    if args.first:  # a second session's rows: their own report, next to the first's
        md = md.with_name(f"gpu_matrix{tag}_from{args.first}.md")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report = [f"# Benchmark matrix, {date.today().isoformat()}, {device}", ""]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="unclip-matrix-") as tmp:  # gone however the run ends
        for row in rows(args.tiny, csv, args.peer_dir)[args.first :]:
            left = args.budget_s - (time.time() - started)
            command = "python -m " + shlex.join(row.argv)
            if left < 0.5 * row.estimate_s:
                heading = f"## {row.name}: not run ({left:.0f} s left of the budget, estimate {row.estimate_s} s)"
                report += [heading, f"`{command}`", ""]
            else:
                print(f"matrix: {row.name} ...", flush=True)
                status, took, tables = run_row(row, left, Path(tmp))
                print(f"matrix: {row.name}: {status} in {took:.0f} s", flush=True)
                report += [f"## {row.name}: {status}, {took:.0f} s", f"`{command}`", "", tables, ""]
            md.write_text("\n".join(report))  # what has been decided so far survives a kill
    print(f"matrix: {md} and {csv}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
