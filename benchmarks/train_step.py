"""Training speed through the real trainer: steps/s, images/s, MFU and peak memory of any entrypoint.

    python -m benchmarks.train_step decoder model/decoder=tiny precision=bf16_autocast trainer.batch_per_gpu=32
    python -m benchmarks.train_step decoder model/decoder=base64 trainer.batch_per_gpu=64 --steps 60   # a GPU
    python -m benchmarks.train_step upsampler model/upsampler=tiny --compare trainer.channels_last=true
    python -m benchmarks.train_step decoder model/decoder=base64 model/clip=ViT-L-14 --embeddings \
        --compare precision=bf16 --compare trainer.compile=true trainer.compile_scope=blocks     # a GPU
    python -m benchmarks.train_step decoder experiment=demo_decoder --embeddings --steps 40 --profile 10

Each configuration trains for --steps optimizer steps in-process through train.run (the DeepSpeed
engine, precision, EMA, loader and all), on synthetic scenes written once at the needed resolution;
no validation, grids, evals or checkpoints run in between. The first --warmup steps (start-up,
kernel selection, torch.compile where on) are timed apart; the rest, from the per-step timestamps of
metrics.jsonl, give the steady rate. MFU uses the FLOPs per sample the trainer counts with
torch.utils.flop_counter and the GPU's dense peak (train/flops.py); on a CPU there is none. Peak
memory: the GPU's max allocated, or the process's max resident set on a CPU. Each --compare runs one
more configuration (the first one's overrides plus its own) in the same process, for flag-off /
flag-on ratios. Every row is appended to --csv (benchmarks/results/train_step.csv by default) with
the date, device and versions. With --profile N, the N steps after --warmup run under torch.profiler
(trainer.profile, train/profiling.py): the operators' table sorted by their own time is printed, and
the rate is taken from the steps after them.

The CLIP of a prior or decoder is the named architecture with random weights (its cost is what
counts; nothing is downloaded). With --embeddings the decoder and prior train as real runs do, from
image embeddings precomputed once by that CLIP (exported once, so every configuration uses the same).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import resource
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from data.synthetic import write_synthetic
from train.config import compose, resolve_batch, to_object
from train.distributed import get_world_size, is_initialized
from train.flops import peak_flops_per_s
from train.precision import resolve_precision
from unclip.provenance import package_versions

ENTRIES = ("clip", "prior", "decoder", "upsampler")
DEFAULT_CSV = Path(__file__).parent / "results" / "train_step.csv"


def task_for(entry: str, job):
    if entry == "clip":
        from train.clip import ClipTask

        return ClipTask(job)
    if entry == "prior":
        from train.prior import PriorTask

        return PriorTask(job)
    if entry == "decoder":
        from train.decoder import DecoderTask

        return DecoderTask(job)
    from train.upsampler import UpsamplerTask

    return UpsamplerTask(job)


def synthetic_shards(root: Path, resolution: int, samples: int) -> Path:
    """Scenes at `resolution`, written once per (resolution, count) under `root`."""
    out = root / f"synthetic-{resolution}px-{samples}"
    if not any(out.glob("*.tar")):
        write_synthetic(out, num_samples=samples, resolution=resolution, samples_per_shard=500, progress=False)
    return out


def random_clip(workdir: Path, clip_cfg) -> Path:
    """The named CLIP architecture with random weights, exported once under `workdir`."""
    from dataclasses import replace

    from unclip.clip import build_clip

    folder = workdir / f"clip-{clip_cfg.arch}-random"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        cfg = replace(clip_cfg, checkpoint=None, pretrained=None, allow_download=False)
        build_clip(cfg, "cuda" if torch.cuda.is_available() else "cpu").export(folder)
    return folder


def precomputed_embeddings(workdir: Path, shards: Path, clip_folder: Path) -> Path:
    """The shards' CLIP image and text embeddings, made once by the exported random CLIP."""
    from data.embed import embed_shards
    from unclip.clip import ClipConfig, build_clip

    out = workdir / f"emb-{shards.name}-{clip_folder.name}"
    if not (out / "metadata").is_dir():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = ClipConfig(checkpoint=str(clip_folder))
        embed_shards(str(shards), build_clip(cfg, device), cfg, out, batch_size=256, progress=False)
    return out


def bench_job(entry: str, overrides: list[str], steps: int, workdir: Path, samples: int, name: str, embeddings=False):
    """The job as given, with the data pointed at synthetic scenes and nothing but training steps."""
    probe = to_object(compose(entry, [*overrides, "data.shards=unused"]))
    shards = synthetic_shards(workdir / "data", probe.data.resolution, samples)
    fixed = [
        f"name={name}",
        f"runs_dir={workdir / 'runs'}",
        f"data.shards={shards}",
        "data.heldout_shards=null",
        "data.heldout_embeddings=null",
        f"trainer.num_steps={steps}",
        "trainer.log_every=1",
        "trainer.val_every=0",
        "trainer.sample_every=0",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
        "trainer.save_at_end=false",  # a 1B model's checkpoint is 16 GB of writes: no part of a step
        "trainer.resume=never",
        "trainer.progress=off",
        "logger=none",
    ]
    if entry in ("prior", "decoder") and embeddings:
        clip = random_clip(workdir, probe.model.clip)
        fixed += [f"model.clip.checkpoint={clip}", f"data.embeddings={precomputed_embeddings(workdir, shards, clip)}"]
        fixed.append(f"data.load_images={'true' if entry == 'decoder' else 'false'}")  # the prior needs none
    else:
        fixed += ["data.embeddings=null", "data.load_images=true"]
        if entry in ("prior", "decoder"):  # the CLIP's architecture (random weights) sets the cost; never a download
            fixed += ["model.clip.checkpoint=null", "model.clip.pretrained=null", "model.clip.allow_download=false"]
    if entry == "prior":
        fixed += ["task.variance_samples=0", "task.decoder=null", "task.sample_prompts=null"]
    if entry == "decoder":
        fixed += ["task.prior=null", "task.sample_prompts=null"]  # no grids to draw
    return to_object(compose(entry, [*overrides, *fixed]))


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(
    entry: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    workdir: Path,
    samples: int,
    embeddings: bool = False,
    profile: int = 0,
) -> dict[str, Any]:
    """One configuration's row. With `profile`, steps warmup+1 .. warmup+profile run under torch.profiler
    (trainer.profile), the operators' table is printed, and the rate is taken after them."""
    from train.run import run

    name = f"bench-{entry}-{int(time.time() * 1000)}"
    window = [f"trainer.profile.start={warmup}", f"trainer.profile.steps={profile}"] if profile else []
    job = bench_job(entry, [*overrides, *window], steps, workdir, samples, name, embeddings)
    gc.collect()  # the last configuration's engine is gone before this one's peak is counted
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    code = run(job, task_for(entry, job))
    if code != 0:
        raise SystemExit(f"error: the {entry} run failed (exit {code}); see its output above")
    run_dir = workdir / "runs" / name
    if profile:
        print((run_dir / "profile" / "ops_rank0.txt").read_text(), flush=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = {m["step"]: m for m in lines if "loss" in m}
    skipped = warmup + profile  # start-up, then the profiled steps (the profiler slows them)
    if len(timed) < skipped + 2:
        raise SystemExit(f"error: {len(timed)} logged steps; --steps must exceed --warmup + --profile + 1")
    first, last = timed[skipped], timed[max(timed)]
    steady = (last["step"] - first["step"]) / (last["time"] - first["time"])
    batch = resolve_batch(job.trainer, get_world_size())[2]
    images_per_s = steady * batch
    peak = peak_flops_per_s(resolve_precision(job.precision))
    flops = last.get("flops_per_sample", 0.0)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "entry": entry,
        "overrides": " ".join(overrides) + (" (precomputed embeddings)" if embeddings else ""),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()}",
        "batch": batch,
        "warmup_s": round(first["time"] - start, 1),
        "steps_per_s": round(steady, 3),
        "images_per_s": round(images_per_s, 1),
        "gflop_per_sample": round(flops / 1e9, 2),
        "mfu": round(flops * images_per_s / peak, 4) if peak else None,
        "peak_mem_gb": round(peak_memory_gb(), 2),
        "versions": " ".join(f"{k} {v}" for k, v in package_versions(("unclip", "torch", "deepspeed")).items()),
    }


def append_csv(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("entry", choices=ENTRIES, help="the training entrypoint")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: the configuration to time")
    p.add_argument("--compare", nargs="+", action="append", default=[], help="more overrides: one more row each")
    p.add_argument("--embeddings", action="store_true", help="prior / decoder: from precomputed CLIP embeddings")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the rate")
    p.add_argument("--samples", type=int, default=2000, help="synthetic scenes to train on")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="record N steps after --warmup with torch.profiler and print the operators by their own time "
        "(trainer.profile; the trace stays in --workdir); the rate is taken after them",
    )
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="where rows are appended")
    p.add_argument("--workdir", type=Path, default=None, help="data and runs (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.steps < args.warmup + args.profile + 2:
        p.error(f"--steps {args.steps} must exceed --warmup + --profile + 1: the rate needs two steps after them")
    header = "| configuration | device | batch | start-up s | steps/s | images/s | GFLOP/sample | MFU | peak GB |"
    print(header + "\n|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for config in [args.overrides] + [args.overrides + extra for extra in args.compare]:
            # each row is printed and appended as soon as it is measured: a later one that fails or is
            # stopped (a GPU session's time limit) loses nothing before it
            row = measure_or_report(args, config, workdir)
            if row is None:
                failed += 1
                continue
            append_csv(args.csv, row)
            print(table_line(row), flush=True)
            rows.append(row)
    for row in rows[1:]:
        print(f"ratio ({row['overrides']} / the first): {row['images_per_s'] / rows[0]['images_per_s']:.2f}x images/s")
    if failed:
        raise SystemExit(f"error: {failed} of {1 + len(args.compare)} configurations failed (their errors are above)")


def measure_or_report(args, config: list[str], workdir: Path) -> dict[str, Any] | None:
    """One configuration's row, or None when it failed: its error is printed as a table line and its
    traceback to stderr, and the next configuration runs. (On an H200 a lever that crashed inside the
    optimizer once left its process hanging to the call's limit, taking the rest of its matrix row.)"""
    try:
        return measure(
            args.entry, config, args.steps, args.warmup, workdir, args.samples, args.embeddings, args.profile
        )
    except (Exception, SystemExit) as e:  # SystemExit: measure's own one-line errors
        traceback.print_exc()
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        print(f"| {args.entry} {' '.join(config)} | failed: {type(e).__name__}: {reason} |", flush=True)
        return None


def leave_process_group() -> None:
    """The trainer keeps its private one-process group for in-process callers (tests train again in
    it); the benchmark's own process leaves it before exiting rather than to interpreter shutdown."""
    if is_initialized():
        torch.distributed.destroy_process_group()


def table_line(row: dict[str, Any]) -> str:
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    return (
        f"| {row['entry']} {row['overrides']} | {row['device']} | {row['batch']} | {row['warmup_s']} | "
        f"{row['steps_per_s']} | {row['images_per_s']} | {row['gflop_per_sample']} | {mfu} | {row['peak_mem_gb']} |"
    )


if __name__ == "__main__":
    try:
        main()
    finally:
        leave_process_group()
