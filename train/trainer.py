"""The one trainer: DeepSpeed engine, precision, EMA, checkpoints, metrics, signals, for every model.

    trainer = Trainer(job_config, task)   # builds everything, resumes if runs/<name> has a checkpoint
    exit_code = trainer.train()           # 0 when done, REQUEUE_EXIT_CODE when preempted
    trainer.close()

A Task (train/task.py) says what a batch is and what the loss is; this file builds the run and runs the
loop, with train/outputs.py (validation, evals, grids, exports) and train/resume.py (what a checkpoint
holds, resuming) mixed in.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data.loader import DataConfig, ShardLoader, split_heldout
from train.checkpoint import CheckpointManager, capture_rng, restore_rng
from train.config import JobConfig, resolve_batch, seed_everything
from train.control import REQUEUE_EXIT_CODE, Control
from train.distributed import (
    all_gather_object,
    all_reduce,
    barrier,
    deepspeed_config,
    device,
    get_rank,
    get_world_size,
    import_deepspeed,
    init_distributed,
    is_main,
    quiet_native_output,
)
from train.ema import ShardedEMA
from train.flops import count_flops, peak_flops_per_s
from train.init_from import init_from_export
from train.metrics import MetricsWriter, Progress, report
from train.optim import build_optimizer, build_scheduler
from train.outputs import RunOutputs
from train.precision import (
    batch_norm_in_fp32,
    resolve_precision,
    uses_autocast,
    weights_dtype,
)
from train.profiling import StepProfiler, phase
from train.record import append_launch, launch_record
from train.resume import RunState
from train.speed import apply_channels_last, apply_compile, check_speed_settings, use_compile_cache
from train.task import Task, TaskContext


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, ...); the last good checkpoint is kept."""


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients (already averaged over ranks at the accumulation boundary)."""
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _slice(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in batch.items()}


class Trainer(RunState, RunOutputs):
    def __init__(self, cfg: JobConfig, task: Task):
        self.cfg, self.task = cfg, task
        tc = cfg.trainer
        init_distributed(cfg.distributed)
        self.rank, self.world = get_rank(), get_world_size()
        self.device = device()
        self.precision = resolve_precision(cfg.precision)
        self.autocast = uses_autocast(cfg.precision, self.precision)
        self.dtype = weights_dtype(cfg.precision, self.precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.precision.tf32
            torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
        self.micro, self.accum, self.batch_global = resolve_batch(tc, self.world)
        self.run_dir = cfg.run_dir
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        seed_everything(cfg.seed, tc.deterministic)
        check_speed_settings(tc, cfg.distributed.zero_stage, self.autocast, self.precision)
        self.ckpt = CheckpointManager(self.run_dir, tc.ckpt_keep)
        resume_from = self.ckpt.resolve(tc.resume)
        if resume_from is not None:
            self._check_same_job(resume_from)
        universal = resume_from is not None and self.ckpt.needs_universal(resume_from)

        task.setup(TaskContext(self.device, self.dtype, self.rank, self.world, cfg.seed))
        model = task.build_model()  # the same seed on every rank: the same initial weights
        if self.dtype != torch.float32:
            batch_norm_in_fp32(model)  # DeepSpeed keeps their statistics fp32 while their weights turn half
        self._init_from(model, resume_from)
        self.data, heldout = split_heldout(task.data_config(cfg.data))
        if heldout is None and is_main():
            print(
                "warning: no held-out set (data.heldout_shards / data.heldout_embeddings), so no validation, "
                "sample grids or in-training evals: give one, or data.heldout=auto to hold out "
                f"{cfg.data.heldout_fraction:.0%} of the training samples",
                file=sys.stderr,
                flush=True,
            )
        self.train_loader = ShardLoader(
            self.data, batch_size=self.micro, rank=self.rank, world_size=self.world, seed=cfg.seed
        )
        self.heldout_loader = self._heldout_loader(heldout) if heldout is not None else None
        self.flops_per_sample = self._count_flops(model)
        self.engine = self._engine(model, universal)
        self._speed_settings()
        if self.world == 1 and self.engine.zero_optimization_stage() == 0:
            # one process: DeepSpeed's gradient all-reduce would only copy every gradient through a buffer
            self.engine.enable_backward_allreduce = False
        self.ema = ShardedEMA(self.engine.module, tc.ema, self.engine.optimizer)
        # DeepSpeed reports the global gradient norm except for plain fp32 data parallel: measure it there.
        self._own_grad_norm = cfg.distributed.zero_stage == 0 and self.dtype == torch.float32
        torch.manual_seed(cfg.seed + 1_000 * self.rank)  # per-rank randomness from here (noise, dropout)

        self.step = 0
        self.samples_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.first_step_s: float | None = None  # this process's first step (logged apart from the rate)
        wandb_id = None
        if resume_from is not None:
            wandb_id = self._resume(resume_from, universal)
        self.train_iter = iter(self.train_loader)
        self.metrics = MetricsWriter(
            self.run_dir,
            cfg.logger,
            cfg.name,
            self._config_dict(),
            wandb_id,
            resumed_step=self.step,  # lines past it (a crash after logging, before saving) are dropped
        )
        self.control = Control(self.run_dir)
        self.profiler = StepProfiler(tc.profile, self.run_dir / "profile", self.rank, self.device)
        self.last_val: dict[str, float] = {}  # for the export's model card
        if is_main():
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            append_launch(self.run_dir, launch_record(self.world, str(resume_from) if resume_from else None))
            print(
                f"run dir {self.run_dir}: {self.world} rank(s), precision {self.precision}"
                f"{' (autocast)' if self.autocast else ''}, "
                f"ZeRO-{cfg.distributed.zero_stage}, batch {self.batch_global} = {self.micro} x "
                f"{self.accum} x {self.world}, {self._param_count() / 1e6:.2f}M trained parameters",
                flush=True,
            )

    # --- construction ----------------------------------------------------------------------------
    def _heldout_loader(self, data: DataConfig) -> ShardLoader | None:
        """Held-out batches split by sample, so the validation set is the same at any GPU count.
        Embeddings-only training validates on held-out embeddings when given, else on images."""
        if not data.heldout_shards and not data.heldout_embeddings:
            return None
        from_embeddings = not data.load_images and data.heldout_embeddings is not None
        if not from_embeddings and not data.heldout_shards:
            return None
        cfg = DataConfig(
            **asdict(data)
            | {
                "shards": data.heldout_shards or "",
                "embeddings": data.heldout_embeddings,
                "load_images": not from_embeddings,
                "resampled": False,
                "split": "samples",
                "shuffle_buffer": 0,
                "num_workers": 0,
                "crop": "center",
            }
        )
        return ShardLoader(cfg, batch_size=self.micro, rank=self.rank, world_size=self.world, seed=self.cfg.seed)

    def _init_from(self, model: torch.nn.Module, resume_from: Path | None) -> None:
        """model.init_from: the export's weights replace the fresh ones (a resumed run has its own)."""
        models = self.cfg.model
        if not models.init_from:
            return
        if resume_from is not None:
            if is_main():
                print(f"model.init_from={models.init_from}: ignored, resuming {resume_from}", flush=True)
            return
        report = init_from_export(model, models.init_from, self.task.kind, self.task.import_weights, models.init_strict)
        if is_main():
            print(f"model.init_from={models.init_from}: {report.describe()}", flush=True)

    def _count_flops(self, model: torch.nn.Module) -> int:
        """FLOPs per sample of one forward + backward, on the plain model before DeepSpeed wraps it.
        Every rank counts, in lockstep and on as many samples as the others: a task's loss may gather
        across ranks (CLIP's contrastive loss does)."""
        loader = self.heldout_loader or ShardLoader(self.data, batch_size=self.micro, num_workers=0)
        batch = next(iter(loader))
        n = torch.tensor([min(self.micro, 4, len(batch["key"]))], device=self.device)
        n = int(all_reduce(n, op="min").item())
        batch = _slice(batch, n)
        rng = capture_rng()  # counting must not move any random stream (bit-exact resume)
        model.to(self.device)

        def forward_backward():
            loss, _ = self.task.loss(model, batch)
            loss.backward()

        flops = count_flops(forward_backward)
        model.zero_grad(set_to_none=True)
        restore_rng(rng)
        return flops // max(1, n)

    def _engine(self, model: torch.nn.Module, universal: bool):
        deepspeed = import_deepspeed()
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        cfg = self.cfg
        optimizer = build_optimizer(model, cfg.optim, self.device.type)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.num_steps)
        ds = deepspeed_config(
            cfg.distributed,
            precision=self.precision,
            micro_batch=self.micro,
            grad_accum=self.accum,
            grad_clip=cfg.trainer.grad_clip,
            autocast=self.autocast,
            flat_master=cfg.precision.master == "flat",
        )
        if universal:
            ds["checkpoint"] = {"load_universal": True}
        # Lets ds_to_universal convert our checkpoints when a job resumes at another world size.
        setattr(
            model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        )
        with quiet_native_output():
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        return engine

    def _speed_settings(self) -> None:
        """trainer.compile* and trainer.channels_last on the engine's model (train/speed.py)."""
        tc = self.cfg.trainer
        if tc.channels_last:  # after DeepSpeed's start-up broadcast, which takes contiguous tensors only
            apply_channels_last(self.engine.module)
        if tc.compile:
            use_compile_cache(tc.compile_cache or Path(self.cfg.runs_dir) / ".compile_cache")
            wrapped = apply_compile(self.engine, tc.compile_scope, tc.compile_backend, tc.compile_mode)
            self._say(
                f"torch.compile: {tc.compile_scope} ({wrapped} wrapped), backend {tc.compile_backend}, mode "
                f"{tc.compile_mode or 'default'}; compiling at the first step (its time is logged as first_step_s)"
            )

    def _param_count(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)

    def _config_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)

    def _model_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.task.export_config(self.engine.module).items() if k != "stats"}

    # --- the loop --------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to trainer.num_steps; returns 0, or REQUEUE_EXIT_CODE after a preemption save."""
        tc = self.cfg.trainer
        self.control.clear_requeue()
        progress = Progress(tc.progress, tc.num_steps, self.step)
        start_time, start_step = time.perf_counter(), self.step
        window = {"t": start_time, "steps": 0, "data_wait": 0.0}
        self.engine.train()
        saved_at = exported_at = validated_at = None
        last_val: dict[str, float] = {}
        try:
            while self.step < tc.num_steps:
                started = time.perf_counter()
                window["data_wait"] += self.train_step()
                self.profiler.after_step(self.step)
                if self.first_step_s is None:  # kernel selection and, with trainer.compile, compilation
                    self.first_step_s = time.perf_counter() - started
                window["steps"] += 1
                step = self.step
                if step % tc.log_every == 0 or step == tc.num_steps:
                    values = self._log(window)
                    per_step = (time.perf_counter() - start_time) / max(1, step - start_step)
                    progress.update(step, values, (tc.num_steps - step) * per_step)
                if tc.val_every and step % tc.val_every == 0:
                    last_val, validated_at = self.validate(), step
                if tc.eval_every and step % tc.eval_every == 0:
                    self.evaluate()
                if tc.sample_every and step % tc.sample_every == 0:
                    self.sample()
                decision = self.control.poll()
                if (tc.ckpt_every and step % tc.ckpt_every == 0) or decision.checkpoint or decision.stop:
                    self.save()
                    saved_at = step
                if (tc.export_every and step % tc.export_every == 0) or decision.export:
                    self.export()
                    exported_at = step
                if decision.stop:
                    self.control.mark_requeue()
                    if is_main():
                        print(
                            f"stopping at step {step} ({self.control.signal_name or 'peer rank'}): "
                            f"checkpoint saved, exit {REQUEUE_EXIT_CODE} to requeue",
                            flush=True,
                        )
                    return REQUEUE_EXIT_CODE
        finally:
            progress.close()
            self.profiler.close(self.step)
        if tc.save_at_end and saved_at != self.step:
            self.save()
        if tc.save_at_end and exported_at != self.step:
            self.export()
        final = last_val  # the summary line: validated at the last step already, or now
        if validated_at != self.step and self.heldout_loader is not None:
            final = self.validate()
        line = self.task.summary(final)
        if line and is_main():
            print(line, flush=True)
        return 0

    def train_step(self) -> float:
        """One optimizer step (grad_accum micro-batches); returns seconds spent waiting for data."""
        wait = 0.0
        done = 0
        while done < self.accum:
            t0 = time.perf_counter()
            with phase("next_batch"):
                batch = next(self.train_iter)
            wait += time.perf_counter() - t0
            with phase("loss"):
                loss, values = self.task.loss(self.engine, batch)
            with phase("finite_check"):
                finite = self._all_finite(loss)
            if not finite:
                continue  # skipped everywhere: no backward, no step, the batch is dropped
            with phase("backward"):
                self.engine.backward(loss)
            if done == self.accum - 1 and self._own_grad_norm:
                report("grad_norm", _grad_norm(self.engine.module))
            with phase("optimizer_step"):
                self.engine.step()
            done += 1
            report("loss", loss)
            for k, v in values.items():
                report(k, v)
        self.step += 1
        self.samples_seen += self.batch_global
        norm = None if self._own_grad_norm else self.engine.get_global_grad_norm()
        if norm is not None:
            report("grad_norm", float(norm))
        with phase("ema"):
            self.ema.update(self.step)
        return wait

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank agrees whether this micro-batch's loss is finite (collective)."""
        bad = (~torch.isfinite(loss.detach()).all()).float().reshape(1)
        if not all_reduce(bad, op="max").item():
            self.nonfinite_in_row = 0
            return True
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        report("nonfinite_skipped", 1.0)
        limit = self.cfg.trainer.max_nonfinite_steps
        if is_main():
            print(
                f"step {self.step + 1}: non-finite loss on some rank, batch skipped "
                f"({self.nonfinite_in_row} in a row, limit {limit})",
                file=sys.stderr,
                flush=True,
            )
        if self.nonfinite_in_row >= limit:
            last = self.ckpt.complete()
            raise TrainingError(
                f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step + 1}: training stopped. "
                f"The last good checkpoint is {last[-1] if last else 'none (no checkpoint was written yet)'}. "
                "Lower optim.lr_peak, raise optim.warmup_steps, or try precision=fp32 / bf16 instead of fp16."
            )
        return False

    # --- logging, validation, samples --------------------------------------------------------------
    def _log(self, window: dict[str, Any]) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(1e-9, now - window["t"])
        images_per_s = window["steps"] * self.batch_global / elapsed
        extra = {
            "lr": self.engine.get_lr()[0],
            "samples_seen": float(self.samples_seen),
            "images_per_s": images_per_s,
            "data_wait_frac": window["data_wait"] / elapsed,
            "nonfinite_total": float(self.nonfinite_total),
            "flops_per_sample": float(self.flops_per_sample),
            "first_step_s": float(self.first_step_s or 0.0),
        }
        peak = peak_flops_per_s(self.precision)
        if peak:
            extra["mfu"] = self.flops_per_sample * images_per_s / (peak * self.world)
        if self.device.type == "cuda":
            report("gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30)
        for rank_skips in all_gather_object(dict(self.train_loader.skipped)):
            for reason, count in rank_skips.items():
                extra[f"skipped/{reason}"] = extra.get(f"skipped/{reason}", 0.0) + count
        values = self.metrics.flush(self.step, extra)
        window.update(t=now, steps=0, data_wait=0.0)
        return values

    def close(self) -> None:
        # Closing the stream shuts its loader workers down now (they ignore the group's SIGTERM; see
        # data.loader.leave_signals_to_the_main_process), rather than at interpreter exit.
        self.train_iter.close()
        self.control.close()
        self.metrics.close()
