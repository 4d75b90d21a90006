"""python -m eval: FID, FD-CLIP, CLIP score (and KID) of a trained stack on held-out captions.

    python -m eval name=demo model.stack=runs/demo data.shards=datasets/demo/heldout data.count=256
    python -m eval eval=coco30k name=coco model.stack=runs/ data.coco=/data/coco \\
        eval.inception.weights=/models/weights-inception-2015-12-05-6726825d.pth
    python -m eval name=sweep model.stack=runs/demo data.shards=... 'eval.guidance=[1,2,3,4]'   # one run
    python -m eval -m name=g model.stack=runs/demo data.shards=... pipeline.decoder_guidance=1,2,3  # a job each
    torchrun --nproc_per_node 8 -m eval name=coco ...                # captions split over ranks

Writes evals/<name>/: the generated images (reused by a rerun), eval.json (every number with its
protocol), report.md, pairs.png (real next to generated) and, for a sweep, guidance.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eval import preempt
from eval.config import EvalJob
from eval.data import load_heldout
from eval.features import ClipFeatures, Inception
from eval.generate import external_images, generate, read_generated
from eval.report import write_report
from eval.scoring import Scorer, distances, guidance_values, real_scorer, settings_for, stream_batches, tag_of
from train.cli import check_overrides, sweep_run_name
from train.distributed import barrier, destroy_distributed, get_rank, get_world_size, init_process_group, is_main


def evaluate(job: EvalJob) -> dict:
    """Run the eval `job` describes on this rank; returns the report (on every rank)."""
    job.validate()
    init_process_group()
    rank, world = get_rank(), get_world_size()
    out = job.out_dir
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    count = job.data.count
    reference = job.eval.real_vs_real
    pipe = load_pipeline(job) if not job.model.generated else None
    heldout = None
    if job.data.shards or job.data.coco:
        job.data.count = count * (2 if reference else 1)  # a second held-out sample as the floor
        heldout = load_heldout(job.data, lambda i: i % world == rank)
        job.data.count = count
    elif pipe is not None:
        raise ValueError("eval data: set data.shards or data.coco: the held-out captions to generate for")
    mine = [i for i in range(count) if i % world == rank]
    resolution = job.data.resolution or (pipe.output_size(job.pipeline.stop_at) if pipe else 256)
    score_clip = build_score_clip(job, pipe)
    extractors = build_extractors(job, score_clip)
    shapes = synthetic_shapes(heldout.captions[:count]) if heldout and job.eval.following else None
    report: dict = {"results": {}, "resolution": resolution, "count": count}
    real = None
    if heldout is not None and extractors:
        real, cached = real_scorer(job, heldout, mine, resolution, extractors, "real")
        report["real_stats_cached"] = cached
    for guidance in guidance_values(job) if pipe else [None]:
        fake = Scorer(extractors, score_clip, job.eval.kid, shapes)
        if pipe is not None:
            settings = settings_for(job, guidance)
            folder = out / "generated" / tag_of(guidance)
            report.setdefault("made", {})[tag_of(guidance)] = generate(
                pipe, job, heldout.captions, mine, folder, settings
            )
            barrier()
            images = read_generated(folder, mine, job.eval.images_per_caption, resolution)
            captions = heldout.captions
            report.setdefault("pipeline", pipe.describe(settings, "text"))
        else:
            images, captions = external_images(Path(job.model.generated), rank, world, resolution)
        for batch, caps in stream_batches(images, job.eval.batch_size, captions):
            fake.update(batch, caps)
        fake.reduce()
        report["results"][tag_of(guidance)] = distances(real, fake, job.eval.kid) | {
            "guidance": guidance,
            "images": fake.count,
        }
    if reference and heldout is not None:
        ref = Scorer(extractors, score_clip, job.eval.kid, shapes)
        ref_idx = [count + i for i in mine]
        for batch, caps in stream_batches(
            heldout.real_images(ref_idx, resolution), job.eval.batch_size, heldout.captions
        ):
            ref.update(batch, caps)
        ref.reduce()
        report["reference"] = distances(real, ref, job.eval.kid) | {"images": ref.count}
    if is_main():
        write_report(job, report, heldout, pipe, extractors, score_clip, mine)
    barrier()
    return report


def load_pipeline(job: EvalJob):
    from unclip.pipeline import Pipeline
    from unclip.sample import find_stack

    m = job.model
    paths = find_stack(m.stack) if m.stack else {}
    for name in ("prior", "decoder", "up256", "up1024", "clip"):
        if getattr(m, name):
            paths[name] = getattr(m, name)
    if "decoder" not in paths:
        raise ValueError(
            "no stack to evaluate: set model.stack=runs/<prefix> or model.decoder=..., or score a "
            "folder of images with model.generated=DIR"
        )
    # held-out captions are data, not user prompts: no prompt filter (it would silently shrink the set)
    return Pipeline.from_exports(**paths, precision=m.precision, progress=False, prompt_filter=None)


def build_score_clip(job: EvalJob, pipe) -> ClipFeatures | None:
    """The CLIP behind FD-CLIP and the CLIP score: an independent one when given (eval=coco30k's default:
    OpenAI's ViT-L/14, what torchmetrics' CLIPScore uses), else, or with eval.score_clip=stack, the
    stack's own, labelled as not independent (it also ranked the prior's candidates)."""
    if not (job.eval.fd_clip or job.eval.clip_score):
        return None
    spec = job.eval.score_clip
    if spec and spec != "stack":
        from eval.features import load_clip

        if ":" not in spec and not Path(spec).is_dir():
            raise ValueError(
                f"eval.score_clip={spec}: the independent CLIP's weights come from a local file, never a download: "
                f"eval.score_clip={spec}:/path/to/{spec}.pt (OpenAI's file for ViT-L-14), or eval.score_clip=stack "
                "to score with the stack's own CLIP (labelled as not independent)"
            )
        return ClipFeatures(load_clip(spec), spec.split(":")[0] + " (independent)")
    if pipe is None:
        raise ValueError("scoring a folder of images needs eval.score_clip (an export folder or arch:checkpoint)")
    return ClipFeatures(pipe.clip, "of the stack (not independent: it also ranked the prior's candidates)")


def build_extractors(job: EvalJob, score_clip: ClipFeatures | None) -> dict:
    extractors = {}
    if job.eval.fid:
        extractors["fid"] = Inception(job.eval.inception)
    if job.eval.fd_clip and score_clip is not None:
        extractors["fd_clip"] = score_clip
    return extractors


def synthetic_shapes(captions: list[str]) -> tuple[str, ...] | None:
    """The shapes synthetic captions name (caption following is measured for them), else None."""
    from data.following import parse_caption

    parsed = [parse_caption(c) for c in captions]
    if not parsed or any(p is None for p in parsed):
        return None
    return tuple(sorted({p["shape"] for p in parsed}))


def run_main(cfg: DictConfig) -> int:
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    job.name = sweep_run_name(job.name)  # -m pipeline.decoder_guidance=1,2,3: evals/<name>/<swept values>
    preempt.install()
    try:
        evaluate(job)
        return 0
    except preempt.Preempted as e:
        print(f"stopped ({e}): the images made so far are kept; rerun (or the requeued job) resumes", flush=True)
        return preempt.REQUEUE_EXIT_CODE
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_distributed()


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run_main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    check_overrides()
    main()
