"""A shared export is data, never code: planted payloads in config.json reach nothing that runs.

Each of the four ways an export is loaded (sampling a stack, evaluating one, embedding with a CLIP
export, training with one as the frozen CLIP) is given a config.json that asks open_clip to unpickle
a file next to it; the payload would create a marker file. The marker must stay absent and the
message must name the file and the key. Then the malformed configs a user may meet: each a one-line
error naming the file.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from data.embed import main as embed_main
from tests.stack_helpers import TINY_CLIP, write_stack
from train.config import compose, to_object
from train.prior import PriorTask
from train.run import run
from unclip.export import CONFIG
from unclip.sample import main as sample_main

# the two records a probe planted: open_clip's own keywords turned against it
WEIGHTS_ONLY_OFF = {"weights_only": False}
SIDE_PATH = {"load_weights": False, "weights_only": False, "pretrained_image_path": None}


class Payload:
    """Unpickling this creates `marker`: what an attacker's pickle would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def plant(folder: Path) -> tuple[Path, Path]:
    """(payload.pt next to the export, the marker it would create)."""
    marker = folder.parent / "PWNED"
    path = folder / "payload.pt"
    torch.save({"state_dict": Payload(marker)}, path)
    return path, marker


@pytest.fixture
def stack(tmp_path):
    return write_stack(tmp_path / "runs")


def _edit(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def _poison_clip_record(record: dict, payload: Path, extra: dict) -> None:
    record["checkpoint"] = str(payload)
    record["extra"] = {k: (str(payload) if v is None else v) for k, v in extra.items()}


@pytest.mark.parametrize("extra", [WEIGHTS_ONLY_OFF, SIDE_PATH], ids=["weights_only", "pretrained_image_path"])
def test_sampling_a_stack_whose_decoder_record_asks_for_a_pickle(stack, tmp_path, capsys, extra):
    payload, marker = plant(stack["decoder"])
    _edit(stack["decoder"], lambda c: _poison_clip_record(c["clip"], payload, extra))
    code = sample_main(["text", "a red circle", "--stack", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and not marker.exists()
    assert f"{stack['decoder'] / CONFIG}: clip.extra.weights_only is not allowed" in err or (
        f"{stack['decoder'] / CONFIG}: clip.extra.load_weights is not allowed" in err
    ), err


def test_a_record_pointing_at_a_pickle_is_read_weights_only(stack, tmp_path, capsys):
    """No extra at all: the checkpoint itself is the payload. It loads weights-only, so it is refused."""
    payload, marker = plant(stack["decoder"])
    _edit(stack["decoder"], lambda c: c["clip"].update(checkpoint=str(payload), model_cfg=TINY_CLIP))
    code = sample_main(["text", "a red circle", "--stack", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and not marker.exists()
    assert f"{payload}: refused to load" in err and "posix.system" in err and "weights_only=False" not in err, err


def test_evaluating_a_poisoned_stack(stack, synthetic_dir, tmp_path, capsys):
    from eval.__main__ import run_main
    from tests.test_eval import job

    payload, marker = plant(stack["decoder"])
    _edit(stack["decoder"], lambda c: _poison_clip_record(c["clip"], payload, WEIGHTS_ONLY_OFF))
    over = [f"evals_dir={tmp_path / 'e'}", "name=x", f"model.stack={tmp_path / 'runs'}"]
    over += [f"data.shards={synthetic_dir / 'heldout'}", "data.count=4", "eval.fid=false"]
    from omegaconf import OmegaConf

    assert run_main(OmegaConf.structured(job(over))) == 1
    assert not marker.exists()
    assert f"{stack['decoder'] / CONFIG}: clip.extra.weights_only is not allowed" in capsys.readouterr().err


def test_embedding_with_a_poisoned_clip_export(stack, synthetic_dir, tmp_path, capsys):
    payload, marker = plant(stack["clip"])
    _edit(
        stack["clip"],
        lambda c: c["clip"].update(extra={k: str(payload) if v is None else v for k, v in SIDE_PATH.items()}),
    )
    argv = ["--shards", str(synthetic_dir / "heldout"), "--clip", str(stack["clip"]), "--out", str(tmp_path / "emb")]
    with pytest.raises(SystemExit) as exit_:
        embed_main(argv)
    assert exit_.value.code not in (0, None) and not marker.exists() and not (tmp_path / "emb").exists()
    assert f"{stack['clip'] / CONFIG}: clip.extra.load_weights is not allowed" in str(exit_.value.code) + (
        capsys.readouterr().err
    )


def test_training_with_a_poisoned_clip_export(stack, synthetic_dir, tmp_path, capsys):
    payload, marker = plant(stack["clip"])
    _edit(stack["clip"], lambda c: c["clip"].update(extra=WEIGHTS_ONLY_OFF))
    over = {
        "name": "p",
        "runs_dir": str(tmp_path / "train"),
        "data.shards": str(synthetic_dir / "train"),
        "data.resolution": 32,
        "data.num_workers": 0,
        "model.clip.checkpoint": str(stack["clip"]),
        "trainer.num_steps": 1,
        "trainer.batch_per_gpu": 4,
        "logger": "none",
    }
    job = to_object(compose("prior", [f"{k}={v}" for k, v in over.items()]))
    assert run(job, PriorTask(job)) == 1
    assert not marker.exists()
    assert f"{stack['clip'] / CONFIG}: clip.extra.weights_only is not allowed" in capsys.readouterr().err


# --- malformed export configs: one line naming the file ---------------------------------------------
def _write(text: bytes):
    return lambda folder: (folder / CONFIG).write_bytes(text)


def _json_edit(change):
    return lambda folder: _edit(folder, change)


MALFORMED = {
    "not_an_object": (_write(b"[1, 2, 3]"), "must be a JSON object, not a list"),
    "empty": (_write(b""), "is empty"),
    "not_utf8": (_write(b"\xff\xfe{}"), "is not UTF-8"),
    "not_json": (_write(b"{kind: decoder"), "is not valid JSON"),
    "no_model_record": (_json_edit(lambda c: c.pop("decoder")), "a decoder export config needs decoder"),
    "wrong_type": (
        _json_edit(lambda c: c["decoder"]["unet"].update(model_channels="sixteen")),
        'decoder.unet.model_channels must be an integer, got "sixteen"',
    ),
    "unknown_key": (_json_edit(lambda c: c["decoder"].update(exec="import os")), "decoder.exec is not a known key"),
    "unknown_top_key": (_json_edit(lambda c: c.update(hook="x")), "hook is not a known key of an export config"),
    "nan": (_json_edit(lambda c: c["decoder"].update(guidance_scale=float("nan"))), "must be a finite number"),
    "record_not_object": (_json_edit(lambda c: c.update(decoder=[1])), "decoder must be an object"),
    "open_clip_tower_fetch": (
        _json_edit(
            lambda c: c["clip"].update(
                arch="custom",
                checkpoint=None,
                model_cfg={"embed_dim": 16, "vision_cfg": {}, "text_cfg": {"hf_model_name": "x"}},
            )
        ),
        "clip.model_cfg.text_cfg.hf_model_name is not allowed in a record",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_export_config_is_one_line_naming_the_file(stack, tmp_path, capsys, case):
    damage, message = MALFORMED[case]
    damage(stack["decoder"])
    code = sample_main(["text", "a red circle", "--stack", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and str(stack["decoder"] / CONFIG) in err and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_record_never_turns_downloads_on(stack, tmp_path, capsys):
    _edit(
        stack["decoder"],
        lambda c: c["clip"].update(arch="ViT-B-32", checkpoint=None, pretrained="openai", allow_download=True),
    )
    code = sample_main(["text", "a red circle", "--stack", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    assert code == 1 and "would be downloaded, and downloads are off" in capsys.readouterr().err
