"""python -m eval on a tiny random stack and the test's own held-out shards: the whole flow, the real
statistics cache, resume, the Inception path on weights the test writes, the CLIP score against a
direct computation, the COCO reader on a COCO-shaped folder, and the errors a user meets first."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import eval.config  # noqa: F401  (registers the schema)
from eval.__main__ import evaluate, run_main
from eval.data import load_heldout
from eval.features import Inception, InceptionConfig, resize_uint8
from tests.trainer_helpers import run_module
from unclip.clip import ClipConfig, build_clip

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
# a dozen images cannot fill a covariance; the warning that says so is tested in test_frechet.py
pytestmark = pytest.mark.filterwarnings("ignore:.*singular covariance:RuntimeWarning")


def job(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose("eval", overrides))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as a plain state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the random initialization
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    model = RandomInit("random", ["2048"], feature_extractor_weights_path=empty)
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    return path


def _common(stack, synthetic_dir, tmp_path) -> list[str]:
    return [
        f"evals_dir={tmp_path / 'evals'}",
        f"cache_dir={tmp_path / 'cache'}",
        f"model.prior={stack['prior']}",
        f"model.decoder={stack['decoder']}",
        f"data.shards={synthetic_dir / 'heldout'}",
        "data.count=12",
        "pipeline.batch_size=6",
        "eval.batch_size=5",
    ]


def test_an_eval_of_a_stack_writes_a_report_and_resumes(stack, synthetic_dir, tmp_path, inception_weights):
    over = _common(stack, synthetic_dir, tmp_path) + [
        "name=tiny",
        f"eval.inception.weights={inception_weights}",
        "eval.real_vs_real=true",
    ]
    report = evaluate(job(over))
    out = tmp_path / "evals" / "tiny"
    saved = json.loads((out / "eval.json").read_text())
    result = saved["results"]["default"]
    assert result["images"] == 12 and set(result) >= {"fid", "fd_clip", "clip_score", "guidance"}
    assert saved["protocol"]["fid_resize"] == "tf_bilinear"
    assert "inception-v3-2015-12-05" in saved["protocol"]["extractors"]["fid"]
    assert saved["reference"]["images"] == 12 and "fid" in saved["reference"]
    assert len(list((out / "generated" / "default").glob("*.png"))) == 12
    assert (out / "report.md").read_text().startswith("# Eval tiny") and (out / "pairs.png").is_file()
    assert report["real_stats_cached"] is False
    again = evaluate(job(over))  # resumes: no image made twice, the real statistics from the cache
    assert again["made"] == {"default": 0} and again["real_stats_cached"] is True
    assert again["results"]["default"]["fid"] == pytest.approx(result["fid"], rel=1e-9)


def test_a_guidance_sweep_in_one_run_plots_the_trade_off(stack, synthetic_dir, tmp_path):
    over = _common(stack, synthetic_dir, tmp_path) + ["name=sweep", "eval.fid=false", "eval.guidance=[1,3]"]
    report = evaluate(job(over))
    assert set(report["results"]) == {"guidance-1", "guidance-3"}
    assert report["results"]["guidance-1"]["fd_clip"] != report["results"]["guidance-3"]["fd_clip"]
    assert (tmp_path / "evals" / "sweep" / "guidance.png").is_file()


def test_the_clip_score_is_the_direct_computation(stack, synthetic_dir, tmp_path):
    over = _common(stack, synthetic_dir, tmp_path) + ["name=cs", "eval.fid=false", "data.count=4"]
    report = evaluate(job(over))
    clip = build_clip(ClipConfig(checkpoint=str(stack["clip"])))
    folder = tmp_path / "evals" / "cs" / "generated" / "default"
    heldout = load_heldout(job(over).data)
    scores = []
    for i in range(4):
        pixels = torch.from_numpy(np.asarray(Image.open(folder / f"{i:06d}_0.png").convert("RGB")).copy())
        pixels = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1
        image = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(clip.encode_captions([heldout.captions[i]]).embedding, dim=-1)
        scores.append(100 * max(float((image * text).sum()), 0.0))
    assert report["results"]["default"]["clip_score"] == pytest.approx(np.mean(scores), rel=1e-4)


def test_inception_weights_load_from_a_file_with_a_clear_error_when_missing(inception_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*eval.inception.weights"):
        Inception(InceptionConfig(weights=str(tmp_path / "nowhere.pth")))
    with pytest.raises(ValueError, match="not the pinned"):
        Inception(InceptionConfig(weights=str(inception_weights), sha256="0" * 64))
    net = Inception(InceptionConfig(weights=str(inception_weights)))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    features = net(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float64
    assert torch.equal(net(images), features)  # deterministic
    pickled = tmp_path / "evil.pth"  # anything but tensors is refused: the file is never unpickled
    torch.save({"x": object()}, pickled)
    with pytest.raises(ValueError, match="evil.pth: refused to load the Inception weights: it holds object, which"):
        Inception(InceptionConfig(weights=str(pickled)))


def test_both_resize_protocols_keep_uint8_and_size():
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    for mode in ("tf_bilinear", "pil_bicubic"):
        out = resize_uint8(images, 299, mode)
        assert out.shape == (2, 3, 299, 299) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="resize must be"):
        resize_uint8(images, 299, "nearest")


def test_the_coco_reader_draws_captions_and_images(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, annotations = [], []
    for k in range(6):
        name = f"COCO_val2014_{k:012d}.jpg"
        Image.fromarray(np.full((30 + k, 40, 3), 20 * k, np.uint8)).save(root / "val2014" / name)
        images.append({"id": k, "file_name": name})
        annotations += [{"image_id": k, "caption": f"photo {k} caption {j}"} for j in range(5)]
    (root / "annotations" / "captions_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    cfg = job(["eval=coco30k", f"data.coco={root}", "data.count=4"]).data
    held = load_heldout(cfg)
    assert len(held.captions) == 4 and len({c.split()[1] for c in held.captions}) == 4  # 4 distinct images
    assert load_heldout(cfg).captions == held.captions  # a fixed seed: the same draw every time
    for i, pixels in held.real_images([0, 3], 256):
        k = int(held.captions[i].split()[1])
        assert pixels.shape == (3, 256, 256) and int(pixels[0, 128, 128]) == 20 * k
    # real_vs_real draws twice the count: its first half is the same images, so the cached statistics of
    # the first set are the same set's; a set of other images has another key
    doubled = load_heldout(job(["eval=coco30k", f"data.coco={root}", "data.count=6"]).data)
    assert doubled.ids[:4] == held.ids and doubled.set_id(range(4)) == held.set_id(range(4))
    other = load_heldout(job(["eval=coco30k", f"data.coco={root}", "data.count=4", "data.seed=1"]).data)
    assert set(other.ids) != set(held.ids) and other.set_id(range(4)) != held.set_id(range(4))
    with pytest.raises(ValueError, match="fewer than data.count=9"):
        load_heldout(job(["eval=coco30k", f"data.coco={root}", "data.count=9"]).data)
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        load_heldout(job(["eval=coco30k", f"data.coco={tmp_path}"]).data)


def test_scoring_images_made_elsewhere(synthetic_dir, tmp_path, stack, capsys):
    folder = tmp_path / "peer"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{k}.png"
        )
        (folder / f"{k}.txt").write_text(f"a red circle number {k}")
    over = [
        f"evals_dir={tmp_path / 'evals'}",
        f"cache_dir={tmp_path / 'cache'}",
        "name=peer",
        "eval.fid=false",
        f"model.generated={folder}",
        f"eval.score_clip={stack['clip']}",
        f"data.shards={synthetic_dir / 'heldout'}",
        "data.count=12",
        "data.resolution=32",
    ]
    report = evaluate(job(over))
    assert report["results"]["default"]["images"] == 6 and "clip_score" in report["results"]["default"]
    assert "fd_clip" in report["results"]["default"]


def test_config_and_input_errors_are_one_clear_line(tmp_path, capsys, stack, synthetic_dir):
    assert run_main(OmegaConf.structured(job([f"evals_dir={tmp_path}", "name=x"]))) == 1
    assert "no stack to evaluate" in capsys.readouterr().err
    # the COCO protocol scores with an independent CLIP, whose weights must be given as a local file
    over = _common(stack, synthetic_dir, tmp_path) + ["name=y", "eval=coco30k", "eval.fid=false", "data.coco=null"]
    assert run_main(OmegaConf.structured(job(over))) == 1
    assert "eval.score_clip=ViT-L-14:/path/to/ViT-L-14.pt" in capsys.readouterr().err


@pytest.mark.multiproc
def test_two_ranks_score_what_one_process_scores(stack, synthetic_dir, tmp_path):
    # data.count given once: the command line refuses a repeated key
    over = [o for o in _common(stack, synthetic_dir, tmp_path) if not o.startswith("data.count=")]
    over += ["eval.fid=false", "data.count=10"]
    one = evaluate(job(over + ["name=one"]))
    done = run_module("eval", [*over, "name=two"], nproc=2, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "evals" / "two" / "eval.json").read_text())
    names = sorted(p.name for p in (tmp_path / "evals" / "two" / "generated" / "default").glob("*.png"))
    assert names == [f"{i:06d}_0.png" for i in range(10)]  # every caption once, whatever rank made it
    a, b = one["results"]["default"], two["results"]["default"]
    assert b["images"] == 10
    assert b["clip_score"] == pytest.approx(a["clip_score"], rel=1e-5)
    assert b["fd_clip"] == pytest.approx(a["fd_clip"], rel=1e-4)
