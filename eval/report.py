"""The eval's report: eval.json (every number with the protocol that produced it), report.md, a grid of
real next to generated images, the guidance trade-off plot of a sweep, and wandb when enabled."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from eval.config import EvalJob
from eval.generate import read_generated
from eval.scoring import tag_of
from unclip.provenance import package_versions

METRIC_NAMES = {"fid": "FID", "fd_clip": "FD-CLIP", "kid": "KID", "kid_clip": "KID-CLIP", "clip_score": "CLIP score"}


def versions() -> dict[str, str]:
    return package_versions(("unclip", "torch", "torch-fidelity", "open_clip_torch", "numpy"))


def protocol(job: EvalJob, report: dict, extractors: dict, score_clip) -> dict[str, Any]:
    d = job.data
    source = f"MS-COCO 2014 val at {d.coco} ({d.count} images drawn with seed {d.seed})" if d.coco else d.shards
    return {
        "data": source or f"images under {job.model.generated}",
        "captions": report["count"],
        "images_per_caption": job.eval.images_per_caption,
        "resolution": report["resolution"],
        "real_images": "center crop, shorter side to the resolution (PIL bicubic)",
        "extractors": {name: ex.name for name, ex in extractors.items()},
        "fid_resize": job.eval.inception.resize if "fid" in extractors else None,
        "clip_score": None
        if score_clip is None
        else {
            "backbone": score_clip.name,
            "formula": "100 x max(cos(image embedding, caption embedding), 0), mean over images",
        },
        "frechet": "float64 sums reduced over ranks, then FD = |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)",
        "versions": versions(),
    }


def write_report(job: EvalJob, report: dict, heldout, pipe, extractors: dict, score_clip, mine: list[int]) -> None:
    out = job.out_dir
    report = report | {
        "name": job.name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "protocol": protocol(job, report, extractors, score_clip),
        "config": json.loads(json.dumps(asdict(job), default=str)),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    if pipe is not None and heldout is not None:
        pairs_grid(job, heldout, mine, report["resolution"], out / "pairs.png")
    if len(report["results"]) > 1:
        guidance_plot(report["results"], out / "guidance.png")
    markdown = summary(report)
    (out / "report.md").write_text(markdown)
    print(markdown, flush=True)
    if job.logger.wandb != "disabled":
        log_wandb(job, report)


def summary(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"# Eval {report['name']}",
        "",
        f"{report['date']}; {p['captions']} captions from {p['data']}, "
        f"{p['images_per_caption']} image(s) each, at {p['resolution']} px.",
        "",
    ]
    rows = dict(report["results"])
    if "reference" in report:
        rows["real vs real (another held-out sample)"] = report["reference"]
    keys = [k for k in ("fid", "fd_clip", "kid", "kid_clip", "clip_score") if any(k in r for r in rows.values())]
    following = any("following" in r for r in rows.values())
    header = ["set", "images"] + [METRIC_NAMES[k] for k in keys] + (["captions followed"] if following else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tag, r in rows.items():
        cells = [tag, str(r.get("images", ""))] + [f"{r[k]:.3f}" if k in r else "" for k in keys]
        if following:
            cells.append(f"{r['following']['all']:.0%}" if "following" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    if "reference" in report:
        lines += [
            "",
            "The real-vs-real row is not a floor: it compares the held-out images with another held-out sample, "
            "whose captions differ, while the generated images were made for this sample's own captions; on a "
            "vocabulary as small as the synthetic set's, a stack that follows its captions scores closer to the "
            "real set than another real sample does. Frechet distances are also biased upward at small sample "
            "sizes (about tr(S)/n); KID is not: compare KIDs between small evals.",
        ]
    lines += ["", "Extractors: " + "; ".join(f"{k}: {v}" for k, v in p["extractors"].items())]
    if p["clip_score"]:
        lines.append(f"CLIP score: {p['clip_score']['formula']}, with {p['clip_score']['backbone']}.")
    if p["fid_resize"]:
        lines.append(f"FID resize: {p['fid_resize']} to 299.")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + ".")
    return "\n".join(lines) + "\n"


def pairs_grid(job: EvalJob, heldout, mine: list[int], resolution: int, path: Path) -> None:
    """Real (top) and generated (below) for the first captions of rank 0."""
    from unclip.grid import captioned_grid

    chosen = mine[: job.eval.grid_pairs]
    if not chosen:
        return
    tag = tag_of(job.eval.guidance[0] if job.eval.guidance else job.pipeline.decoder_guidance)
    real = [img for _, img in heldout.real_images(chosen, resolution)]
    fake = [img for _, img in read_generated(job.out_dir / "generated" / tag, chosen, 1, resolution)]
    captions = [f"real: {heldout.captions[i]}" for i in chosen] + [f"generated: {heldout.captions[i]}" for i in chosen]
    captioned_grid(torch.stack(real + fake), captions, columns=len(chosen), cell=min(256, resolution)).save(path)


def guidance_plot(results: dict, path: Path) -> None:
    """The paper's fig. 7 analogue: the distance against the CLIP score, one point per guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "fid" if all("fid" in r for r in results.values()) else "fd_clip"
    points = [
        (r["clip_score"], r[metric], r["guidance"]) for r in results.values() if metric in r and "clip_score" in r
    ]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for x, y, g in points:
        ax.annotate(f"{g:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("CLIP score")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title("decoder guidance scale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_wandb(job: EvalJob, report: dict) -> None:
    import wandb

    run = wandb.init(
        project=job.logger.project,
        entity=job.logger.entity,
        name=f"eval-{job.name}",
        mode=job.logger.wandb,
        dir=str(job.out_dir),
        config=report["protocol"],
        job_type="eval",
    )
    for tag, r in report["results"].items():
        run.summary.update({f"{tag}/{k}": v for k, v in r.items() if isinstance(v, int | float)})
    for name in ("pairs.png", "guidance.png"):
        if (job.out_dir / name).is_file():
            run.log({name[:-4]: wandb.Image(str(job.out_dir / name))})
    run.finish()
