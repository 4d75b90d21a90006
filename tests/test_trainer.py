"""The trainer in one process: the loop, metrics, checkpoints, export, EMA, the non-finite guard."""

from __future__ import annotations

import json
import math
from importlib import metadata

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import clip_job, metrics
from train.checkpoint import CheckpointError, CheckpointManager
from train.clip import ClipTask
from train.clip import train as train_clip
from train.config import TrainerConfig, resolve_batch
from train.distributed import (
    DistributedConfig,
    deepspeed_config,
    import_deepspeed,
    init_distributed,
    quiet_native_output,
)
from train.ema import EmaConfig, ShardedEMA
from train.optim import OptimConfig, lr_multiplier, param_groups
from unclip.clip import ClipConfig, build_clip


def test_batch_sizes_from_any_two():
    tc = lambda **kw: TrainerConfig(**({"batch_per_gpu": None} | kw))  # noqa: E731
    assert resolve_batch(tc(batch_global=64, batch_per_gpu=8), 4) == (8, 2, 64)
    assert resolve_batch(tc(batch_global=64, grad_accum=2), 4) == (8, 2, 64)
    assert resolve_batch(tc(batch_per_gpu=8, grad_accum=3), 2) == (8, 3, 48)
    assert resolve_batch(tc(batch_per_gpu=8), 2) == (8, 1, 16)
    with pytest.raises(ValueError, match="multiple"):
        resolve_batch(tc(batch_global=60, batch_per_gpu=8), 4)
    with pytest.raises(ValueError, match="!="):
        resolve_batch(tc(batch_global=64, batch_per_gpu=8, grad_accum=1), 4)


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", lr_final_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(50, OptimConfig(warmup_steps=0, schedule="constant"), 100) == 1.0


def test_weight_decay_skips_norms_and_biases():
    clip = build_clip(
        ClipConfig(
            model_cfg={
                "embed_dim": 8,
                "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "patch_size": 4, "head_width": 8},
                "text_cfg": {"context_length": 8, "width": 16, "heads": 2, "layers": 1},
            },
            frozen=False,
        )
    )
    decay, no_decay = param_groups(clip, 0.1)
    names = {id(p): n for n, p in clip.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith(".bias") for n in skipped) and any("ln_" in n for n in skipped)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_ema_matches_the_formula_in_one_process():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    ema = ShardedEMA(net, EmaConfig(decay=0.9, warmup=False))
    reference = {n: p.detach().clone() for n, p in net.named_parameters()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(step)
        for n, p in net.named_parameters():
            reference[n] = 0.9 * reference[n] + 0.1 * p.detach()
    full = ema.full_state_dict()
    for n in reference:
        torch.testing.assert_close(full[n], reference[n])
    before = net.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(net.weight.detach(), reference["weight"])
    assert torch.equal(net.weight.detach(), before)


@pytest.mark.parametrize(
    "zero,offload",
    [(0, ""), (1, ""), (2, ""), (3, ""), (2, "optimizer"), (3, "optimizer+params")],
)
def test_ema_averages_the_fp32_master_weights_under_bf16(zero, offload, monkeypatch):
    """With bf16 weights and updates far below one bf16 step, the EMA follows DeepSpeed's fp32
    master copy to fp32 precision (an EMA of the bf16 working copies is off by ~2^-9 relative)."""
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_fp32_param

    # A ZeRO-3 engine replaces F.linear for good; put it back afterwards, for the tests that follow.
    monkeypatch.setattr(F, "linear", F.linear)

    init_distributed(DistributedConfig())
    deepspeed = import_deepspeed()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    where = DistributedConfig(
        zero_stage=zero, offload_optimizer="optimizer" in offload, offload_params="params" in offload
    )
    ds = deepspeed_config(where, precision="bf16", micro_batch=4, grad_accum=1, grad_clip=0)
    with quiet_native_output():
        engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-5), config=ds)
    ema = ShardedEMA(engine.module, EmaConfig(decay=0.5, warmup=False), engine.optimizer)
    if zero == 0:  # DeepSpeed's ZeRO-0 bf16 wrapper keeps whole fp32 copies, group by group
        opt = engine.optimizer
        pairs = {id(p): q for ps, qs in zip(opt.fp16_groups, opt.fp32_groups) for p, q in zip(ps, qs)}
        fp32 = lambda p: pairs[id(p)]  # noqa: E731
    else:
        fp32 = safe_get_full_fp32_param
    master = lambda: {n: fp32(p).detach().double().clone() for n, p in engine.module.named_parameters()}  # noqa: E731
    reference = master()
    start = {n: v.clone() for n, v in reference.items()}
    for step in range(1, 6):
        loss = engine(torch.randn(4, 32, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(step)
        reference = {n: 0.5 * reference[n] + 0.5 * v for n, v in master().items()}
    full = ema.full_state_dict()
    for n, value in reference.items():
        moved = (value - start[n]).abs().max().item()
        assert 0 < moved < 1e-3, n  # the updates are real, and below bf16 resolution for most weights
        torch.testing.assert_close(full[n].double(), value, rtol=1e-6, atol=1e-9)


def test_train_writes_metrics_checkpoints_and_an_export(synthetic_dir, tmp_path):
    job = clip_job(
        synthetic_dir, tmp_path, "run", 6, **{"trainer.ckpt_every": 2, "trainer.val_every": 3, "trainer.ckpt_keep": 2}
    )
    assert train_clip(job) == 0
    run = tmp_path / "run"
    lines = metrics(run)
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "samples_seen", "data_wait_frac", "flops_per_sample"):
        assert key in train_lines[-1], key
    assert train_lines[-1]["samples_seen"] == 6 * 8
    assert any("val/retrieval_i2t" in m for m in lines)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (run / "config.yaml").exists()
    # the run explains itself: how it was launched, and a model card with the export
    (launch,) = [json.loads(line) for line in (run / "launches.jsonl").read_text().splitlines()]
    assert launch["world_size"] == 1 and launch["resumed_from"] is None and launch["command"]
    assert launch["versions"]["torch"] == metadata.version("torch")
    assert launch["machine"]["cpus"] and launch["machine"]["gpus"] == []
    assert launch["git"] is None or set(launch["git"]) == {"commit", "dirty"}
    card = (run / "export" / "README.md").read_text()
    assert "an unclip clip" in card and "step 6" in card and "build_clip(ClipConfig(checkpoint=" in card
    assert "val/retrieval_i2t" in card
    # the export loads without pickle, as a CLIP, and holds the EMA weights
    weights = load_file(str(run / "export" / "model.safetensors"))
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["kind"] == "clip" and config["step"] == 6
    clip = build_clip(ClipConfig(checkpoint=str(run / "export")))
    torch.testing.assert_close(clip.model.state_dict()["logit_scale"], weights["logit_scale"])


def test_a_crash_mid_checkpoint_leaves_the_last_good_one(synthetic_dir, tmp_path):
    job = clip_job(synthetic_dir, tmp_path, "run", 2, **{"trainer.ckpt_every": 2})
    assert train_clip(job) == 0
    ckpts = CheckpointManager(tmp_path / "run", keep=2)
    stale = ckpts.root / "step_00000009.tmp"
    (stale / "ds").mkdir(parents=True)  # a save killed half-way: after its trainer.json, before the rename
    (stale / "trainer.json").write_text(json.dumps({"step": 9, "world_size": 1}))
    assert [p.name for p in ckpts.complete()] == ["step_00000002"]
    with pytest.raises(CheckpointError, match="trainer.resume=auto"):
        ckpts.resolve(str(stale / "missing"))
    assert ckpts.resolve("auto").name == "step_00000002"
    assert not stale.exists()  # removed at start
    (stale / "ds").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="trainer.resume=auto"):
        ckpts.resolve(str(ckpts.root / "step_00000009.tmp"))


def test_a_full_disk_at_save_says_so_and_keeps_the_previous_checkpoint(synthetic_dir, tmp_path, capsys, monkeypatch):
    import errno

    import train.checkpoint

    real, saves = train.checkpoint._save_rank_state, []

    def full_on_the_second_save(folder, state):
        saves.append(folder)
        if len(saves) == 2:
            (folder / "partial.bin").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(folder, state)

    monkeypatch.setattr(train.checkpoint, "_save_rank_state", full_on_the_second_save)
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 4, **{"trainer.ckpt_every": 2})) == 1
    err = capsys.readouterr().err
    assert "the disk is full: saving step_00000004" in err and "free; a checkpoint of this run needs about" in err
    assert "the previous checkpoints are kept (step_00000002)" in err
    ckpts = CheckpointManager(tmp_path / "run", keep=2)
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["latest", "step_00000002"]  # no partial left
    assert ckpts.resolve("auto").name == "step_00000002"


@pytest.fixture(scope="module")
def checkpointed_run(synthetic_dir, tmp_path_factory):
    """A run of the tiny CLIP with a checkpoint at step 2, copied by each test that damages it."""
    runs = tmp_path_factory.mktemp("checkpointed")
    assert train_clip(clip_job(synthetic_dir, runs, "run", 2, **{"trainer.ckpt_every": 2})) == 0
    return runs / "run"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "ema_junk": ("ema_rank00000.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "is not a readable safetensors"),
    "rng_junk": ("rank00000.rng.safetensors", lambda p: p.write_bytes(b"hello"), "is not a readable safetensors"),
    "ema_truncated": ("ema_rank00000.safetensors", _truncate, "is not a readable safetensors"),
    "model_states_truncated": ("ds/mp_rank_00_model_states.pt", _truncate, "is not a complete torch file"),
    "rank_json_truncated": ("rank00000.json", _truncate, "the checkpoint state is not valid JSON"),
    "trainer_json_truncated": ("trainer.json", _truncate, "the checkpoint state is not valid JSON"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_file_is_named_in_one_line(synthetic_dir, checkpointed_run, tmp_path, capsys, case):
    import shutil

    name, damage, what = DAMAGE[case]
    shutil.copytree(checkpointed_run, tmp_path / "run")
    damage(tmp_path / "run" / "checkpoints" / "step_00000002" / name)
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 4)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and name in err[0] and what in err[0], err


def test_a_resume_from_another_runs_checkpoint_names_that_checkpoint(synthetic_dir, checkpointed_run, tmp_path, capsys):
    step = checkpointed_run / "checkpoints" / "step_00000002"
    other = clip_job(synthetic_dir, tmp_path, "mine", 4, **{"trainer.resume": str(step), "data.resolution": 28})
    assert train_clip(other) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {step} was written by a run of another model or data (data.resolution: 32 -> 28" in err
    assert f"model.init_from={checkpointed_run / 'export'}" in err and str(tmp_path / "mine") not in err


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(synthetic_dir, tmp_path):
    """Lines of steps 1-3 from a run that died before saving: the fresh start replaces them."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 9.0}) + "\n" for i in (1, 2, 3))
    )
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 2)) == 0
    steps = [m["step"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert steps == [1, 2] and all(m["loss"] != 9.0 for m in metrics(tmp_path / "run") if "loss" in m)


def test_a_full_disk_during_export_leaves_no_partial_export(tmp_path, monkeypatch):
    import errno

    import unclip.export
    from unclip.export import ExportError, write_export

    write_export(tmp_path / "export", {"w": torch.ones(2)}, {"kind": "clip"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unclip.export, "save_file", full)
    with pytest.raises(ExportError, match="the disk is full: writing the export .* the previous export is kept"):
        write_export(tmp_path / "export", {"w": torch.zeros(2)}, {"kind": "clip"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no export.tmp
    assert load_file(str(tmp_path / "export" / "model.safetensors"))["w"].sum() == 2


class Payload:
    """What an attacker plants in a checkpoint: unpickling it creates a file (it could run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(synthetic_dir, tmp_path, capsys):
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 2, **{"trainer.ckpt_every": 2})) == 0
    states = tmp_path / "run" / "checkpoints" / "step_00000002" / "ds" / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    marker = tmp_path / "pwned"
    torch.save(state | {"extra": Payload(marker)}, states)
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 4)) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert (
        "mp_rank_00_model_states.pt: refused to load" in err and "it holds io.open, which is more than weights" in err
    )
    # the untouched checkpoint of another run resumes (weights-only, with DeepSpeed's types allowed)
    assert train_clip(clip_job(synthetic_dir, tmp_path, "clean", 2, **{"trainer.ckpt_every": 2})) == 0
    assert train_clip(clip_job(synthetic_dir, tmp_path, "clean", 3)) == 0
    assert "resumed from" in capsys.readouterr().out


def test_resume_with_another_model_or_data_is_refused_and_other_changes_are_recorded(synthetic_dir, tmp_path, capsys):
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 2)) == 0
    other = clip_job(synthetic_dir, tmp_path, "run", 4, **{"model.clip.model_cfg.text_cfg.layers": 2})
    assert train_clip(other) == 1
    err = capsys.readouterr().err
    assert "model.clip.model_cfg.text_cfg.layers: 3 -> 2" in err and "name=..." in err
    elsewhere = clip_job(synthetic_dir, tmp_path, "run", 4, **{"data.shards": str(synthetic_dir / "heldout")})
    assert train_clip(elsewhere) == 1
    assert (
        f"data.shards: {str(synthetic_dir / 'train')!r} -> {str(synthetic_dir / 'heldout')!r}"
        in capsys.readouterr().err
    )
    # longer, logged more often, at another learning rate: the same run, the learning rate recorded
    more = clip_job(synthetic_dir, tmp_path, "run", 3, **{"trainer.log_every": 2, "optim.lr_peak": 1e-4})
    assert train_clip(more) == 0
    assert "resuming with changed settings: optim.lr_peak" in capsys.readouterr().out
    changes = [json.loads(line) for line in (tmp_path / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [
        {"step": 2, "changes": {"optim.lr_peak": {"from": changes[0]["changes"]["optim.lr_peak"]["from"], "to": 1e-4}}}
    ]
    assert changes[0]["changes"]["optim.lr_peak"]["from"] != 1e-4
    # fp32 weights' optimizer state does not belong to bf16 weights (what precision=auto now gives a GPU)
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 5, precision="bf16")) == 1
    assert "holds float32 weights and their optimizer state, and this run trains bfloat16" in capsys.readouterr().err


class FlakyClip(ClipTask):
    """Returns a NaN loss on the given loss calls (counted from 1)."""

    def __init__(self, job, bad_calls):
        super().__init__(job)
        self.bad_calls, self.calls = set(bad_calls), 0

    def loss(self, model, batch):
        self.calls += 1
        loss, values = super().loss(model, batch)
        return (loss * math.nan if self.calls in self.bad_calls else loss), values


def test_a_non_finite_loss_is_skipped_and_counted(synthetic_dir, tmp_path):
    from train.run import run

    job = clip_job(synthetic_dir, tmp_path, "run", 4)
    task = FlakyClip(job, bad_calls={3})
    assert run(job, task) == 0
    last = [m for m in metrics(tmp_path / "run") if "loss" in m][-1]
    assert last["nonfinite_total"] == 1 and math.isfinite(last["loss"])
    assert task.calls == 4 + 1 + 1  # 4 steps, the bad batch, the flop count


def test_repeated_non_finite_losses_stop_training_and_keep_the_last_checkpoint(synthetic_dir, tmp_path, capsys):
    from train.run import run

    job = clip_job(synthetic_dir, tmp_path, "run", 10, **{"trainer.ckpt_every": 2, "trainer.max_nonfinite_steps": 3})
    task = FlakyClip(job, bad_calls=range(1 + 5, 100))  # good for the flop count and 4 steps, then NaN
    assert run(job, task) == 1
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row" in err and "step_00000004" in err
    done = CheckpointManager(tmp_path / "run", keep=2).complete()
    assert done[-1].name == "step_00000004"


class SamplingClip(ClipTask):
    """A task with a sample function: the held-out images themselves, as a grid."""

    def sample(self, model, batch):
        from train.task import Grid

        return Grid(batch["image"][:4], batch["caption"][:4], columns=2)


def test_sample_grids_are_saved_at_their_interval(synthetic_dir, tmp_path):
    from train.run import run

    job = clip_job(synthetic_dir, tmp_path, "run", 4, **{"trainer.sample_every": 2})
    assert run(job, SamplingClip(job)) == 0
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == ["step_00000002.png", "step_00000004.png"]


def test_zero3_with_cpu_offload_trains(synthetic_dir, tmp_path):
    job = clip_job(synthetic_dir, tmp_path, "run", 3, **{"distributed": "zero3_offload", "trainer.ckpt_every": 3})
    assert train_clip(job) == 0
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "run" / "export" / "model.safetensors").exists()


def test_requests_by_file_give_a_checkpoint_and_an_export(synthetic_dir, tmp_path):
    from train.run import run

    class Requesting(ClipTask):
        def loss(self, model, batch):  # asks during step 2, as a user's `touch` would
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                (tmp_path / "run" / "CHECKPOINT").touch()
                (tmp_path / "run" / "EXPORT").touch()
            return super().loss(model, batch)

    job = clip_job(synthetic_dir, tmp_path, "run", 4, **{"trainer.save_at_end": False})
    assert run(job, Requesting(job)) == 0
    # the requested ones, at step 2; none at the end (trainer.save_at_end=false, what benchmarks use)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "CHECKPOINT").exists() and not (tmp_path / "run" / "EXPORT").exists()


def test_resume_never_will_not_overwrite_a_run(synthetic_dir, tmp_path, capsys):
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 2)) == 0
    again = clip_job(synthetic_dir, tmp_path, "run", 2, **{"trainer.resume": "never"})
    assert train_clip(again) == 1
    assert "trainer.resume=never will not overwrite" in capsys.readouterr().err


def test_bf16_autocast_keeps_fp32_weights_and_runs_matmuls_in_bf16(synthetic_dir, tmp_path):
    from train.distributed import DistributedConfig, deepspeed_config
    from train.trainer import Trainer

    ds = deepspeed_config(
        DistributedConfig(), precision="bf16", micro_batch=2, grad_accum=1, grad_clip=1, autocast=True
    )
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    job = clip_job(synthetic_dir, tmp_path, "autocast", 3, precision="bf16_autocast")
    trainer = Trainer(job, ClipTask(job))
    seen = set()
    linear = next(m for n, m in trainer.engine.module.named_modules() if n.endswith("mlp.c_fc"))  # an MLP's Linear
    linear.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    assert seen == {torch.bfloat16}  # computed in bf16 ...
    assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())  # ... stored in fp32
    lines = [m for m in metrics(tmp_path / "autocast") if "loss" in m]
    assert len(lines) == 3 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in lines)
    with pytest.raises(ValueError, match="autocast=true needs a half-precision dtype"):
        from train.precision import PrecisionConfig, resolve_precision

        resolve_precision(PrecisionConfig(dtype="fp32", autocast=True))


def test_a_resnet_clip_trains_under_bf16_weights(synthetic_dir, tmp_path):
    job = clip_job(synthetic_dir, tmp_path, "resnet-bf16", 2, precision="bf16", **{"model/clip": "tiny_resnet"})
    assert train_clip(job) == 0
    lines = [m for m in metrics(tmp_path / "resnet-bf16") if "loss" in m]
    assert len(lines) == 2 and all(math.isfinite(m["loss"]) for m in lines)


def test_wandb_online_without_a_login_says_what_to_do(synthetic_dir, tmp_path, capsys, monkeypatch):
    import wandb
    from wandb.errors import UsageError

    def no_login(**_):
        raise UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", no_login)
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 2, logger="wandb")) == 1
    err = capsys.readouterr().err
    assert "wandb (online) could not start a run: api_key not configured" in err and "logger=offline" in err


def test_a_resumed_run_logs_every_step_once(synthetic_dir, tmp_path):
    import shutil

    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 4, **{"trainer.ckpt_every": 2})) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")  # as if killed after logging step 4, before saving it
    (ckpts / "latest").write_text("step_00000002")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')  # and a line cut short by the kill
    assert train_clip(clip_job(synthetic_dir, tmp_path, "run", 4, **{"trainer.ckpt_every": 2})) == 0
    steps = [m["step"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert steps == [1, 2, 3, 4]
