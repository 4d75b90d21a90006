"""The unCLIP diffusion prior: CLIP text -> CLIP image embedding (Ramesh et al. 2022, sec. 2.2).

A decoder-only transformer with a causal mask over the sequence

    [CLIP text token outputs (T), text embedding, timestep, noised image embedding, learned query]

whose output at the query predicts the clean image embedding (x0 target, MSE). Text conditioning is
dropped 10% of the time (learned null tokens take its place) for classifier-free guidance.
Embeddings are l2-normalized, then scaled by 17.2 (unCLIP App. C) or standardized per dimension with
statistics of the training data (Karlo), which live in the model's buffers and so in every export.
Sampling draws N candidates per caption and keeps the one with the largest dot product with the
text embedding (unCLIP sec. 2.2: "best of 2").

    prior = load_prior("runs/prior/export")
    emb = prior.sample(text_embedding, text_tokens, text_mask, generator=make_generator(0))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unclip.diffusion import Diffusion, DiffusionConfig, Generators
from unclip.export import CONFIG, read_export
from unclip.layers import TimestepMLP, TransformerBlock, run_block
from unclip.records import from_record


def _prior_diffusion() -> DiffusionConfig:
    # unCLIP App. C: cosine schedule, 1000 steps, x0 target; sampled with 64 strided steps and
    # Analytic-DPM's variance where the export holds its estimate (ancestral sampling where not)
    return DiffusionConfig(schedule="cosine", num_timesteps=1000, target="x0", sample_steps="64", variance="analytic")


@dataclass
class PriorConfig:
    width: int = 768  # transformer width
    depth: int = 12  # transformer blocks
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    use_text_tokens: bool = True  # the CLIP text encoder's per-token outputs join the sequence
    normalization: str = "scale"  # scale: l2-normalize, x emb_scale | stats: per-dimension mean / std
    # unCLIP App. C: x 17.2 matches the embeddings' variance to that of RGB pixels in [-1, 1] for the
    # paper's 1024-d CLIP (ViT-H/16: a unit vector's per-dimension std 1/32 becomes 0.54); in general
    # the std is 17.2 / sqrt(D): 0.62 for ViT-L/14's 768 dimensions, 0.54 for ViT-H/14's 1024
    emb_scale: float = 17.2
    cond_drop_prob: float = 0.1  # text conditioning dropped for classifier-free guidance (unCLIP sec. 2.2)
    num_candidates: int = 2  # sampling: best of N by dot product with the text embedding
    guidance_scale: float = 1.0  # 1 = unguided; the paper found guiding the prior hurt
    checkpointing: bool = False  # activation checkpointing per transformer block (less memory, ~1/3 more compute)
    # padded caption tokens: mask (a padding mask on top of the causal one: SDPA's memory-efficient kernel)
    # | learned (replaced by learned per-position padding embeddings, GLIDE's fixed-length context: causal
    # attention alone, so flash attention)
    caption_padding: str = "mask"
    diffusion: DiffusionConfig = field(default_factory=_prior_diffusion)

    def validate(self) -> None:
        if self.caption_padding not in ("mask", "learned"):
            raise ValueError(f"prior.caption_padding must be mask or learned, got {self.caption_padding!r}")
        if self.normalization not in ("scale", "stats"):
            raise ValueError(f"prior.normalization must be 'scale' or 'stats', got {self.normalization!r}")
        if self.num_candidates < 1:
            raise ValueError("prior.num_candidates must be at least 1")
        self.diffusion.validate()


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: PriorConfig, embed_dim: int, text_width: int, context_length: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim, self.text_width, self.context_length = embed_dim, text_width, context_length
        w = cfg.width
        n_text = context_length if cfg.use_text_tokens else 0
        if cfg.use_text_tokens:
            self.text_token_proj = nn.Linear(text_width, w)
            self.null_text_tokens = nn.Parameter(torch.randn(context_length, w) * 0.02)
            if cfg.caption_padding == "learned":
                self.pad_text_tokens = nn.Parameter(torch.randn(context_length, w) * 0.02)
        self.text_embed_proj = nn.Linear(embed_dim, w)
        self.null_text_embed = nn.Parameter(torch.randn(w) * 0.02)
        self.time_embed = TimestepMLP(w)
        self.x_proj = nn.Linear(embed_dim, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(n_text + 4, w) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, embed_dim)
        # Normalization statistics ("stats" mode); identity until set_stats. Buffers: saved with the weights.
        for name in ("image_mean", "text_mean"):
            self.register_buffer(name, torch.zeros(embed_dim))
        for name in ("image_std", "text_std"):
            self.register_buffer(name, torch.ones(embed_dim))
        self.diffusion = Diffusion(cfg.diffusion)
        self.x0_error: dict[str, Any] | None = None  # measured on data at export (Analytic-DPM variance)

    def no_weight_decay(self) -> set[str]:
        return {"null_text_tokens", "null_text_embed", "query", "pos_embed", "pad_text_tokens"}

    # --- embedding spaces --------------------------------------------------------------------------
    def _normalize(self, e: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.float(), dim=-1)
        if self.cfg.normalization == "scale":
            return e * self.cfg.emb_scale
        return (e - mean.float()) / std.float()

    def normalize_image(self, e: torch.Tensor) -> torch.Tensor:
        """A CLIP image embedding -> the space the diffusion runs in."""
        return self._normalize(e, self.image_mean, self.image_std)

    def normalize_text(self, e: torch.Tensor) -> torch.Tensor:
        return self._normalize(e, self.text_mean, self.text_std)

    def denormalize_image(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion's space -> a unit-norm CLIP image embedding."""
        if self.cfg.normalization == "scale":
            e = x / self.cfg.emb_scale
        else:
            e = x * self.image_std.float() + self.image_mean.float()
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def set_stats(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
        """Per-dimension statistics of l2-normalized training embeddings ("stats" normalization)."""
        for prefix, e in (("image", image_embeds), ("text", text_embeds)):
            e = F.normalize(e.float(), dim=-1)
            getattr(self, f"{prefix}_mean").copy_(e.mean(dim=0))
            getattr(self, f"{prefix}_std").copy_(e.std(dim=0).clamp(min=1e-6))

    # --- the network -------------------------------------------------------------------------------
    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the clean (normalized) image embedding.

        x_t (B, D) noised embedding in the diffusion space; t (B,) original timesteps; text_embed
        (B, D) raw CLIP text embedding; text_tokens (B, T, W) and text_mask (B, T) the text encoder's
        outputs; drop (B,) True where the text conditioning is replaced by the null embeddings."""
        b = x_t.shape[0]
        dtype = self.x_proj.weight.dtype
        drop = torch.zeros(b, dtype=torch.bool, device=x_t.device) if drop is None else drop
        text = self.text_embed_proj(self.normalize_text(text_embed).to(dtype))
        text = torch.where(drop[:, None], self.null_text_embed.to(dtype), text)
        parts = [
            text[:, None],
            self.time_embed(t)[:, None],
            self.x_proj(x_t.to(dtype))[:, None],
            self.query.to(dtype).expand(b, 1, -1),
        ]
        valid = torch.ones(b, 4, dtype=torch.bool, device=x_t.device)
        if self.cfg.use_text_tokens:
            if text_tokens is None or text_mask is None:
                raise ValueError("this prior reads the CLIP text token outputs: pass text_tokens and text_mask")
            tokens = self.text_token_proj(text_tokens.to(dtype))
            tokens = torch.where(drop[:, None, None], self.null_text_tokens.to(dtype), tokens)
            token_valid = text_mask | drop[:, None]  # the null tokens are all real
            if self.cfg.caption_padding == "learned":  # a fixed-length context: nothing left out
                tokens = torch.where(token_valid[:, :, None], tokens, self.pad_text_tokens.to(dtype))
                token_valid = torch.ones_like(token_valid)
            parts.insert(0, tokens)
            valid = torch.cat([token_valid, valid], dim=1)
        h = torch.cat(parts, dim=1) + self.pos_embed.to(dtype)
        n = h.shape[1]
        mask = None  # learned padding: causal attention alone (is_causal, which flash attention takes)
        if self.cfg.caption_padding == "mask":
            causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
            mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, L, L): earlier, non-padding keys only
        for block in self.blocks:
            h = run_block(block, h, mask, mask is None, checkpoint=self.cfg.checkpointing)
        return self.out(self.norm(h[:, -1]))

    # --- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        num_candidates: int | None = None,
        guidance_scale: float | None = None,
        steps: str | None = None,
        generator: Generators = None,
        on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        negative: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """(B, D) unit-norm CLIP image embeddings for the captions encoded in the inputs.

        generator: one, or one per caption (which then draws that caption's candidates).
        negative: (text_embed, text_tokens, text_mask) of a caption to steer away from, read by the
        guided pass's unconditional half instead of the learned null conditioning (scale != 1 only)."""
        n = num_candidates or self.cfg.num_candidates
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        b = text_embed.shape[0]
        rep = lambda x: None if x is None else x.repeat_interleave(n, dim=0)  # noqa: E731
        te, tt, tm = rep(text_embed), rep(text_tokens), rep(text_mask)
        # The unconditional half: the null conditioning, or the negative caption's (then not dropped).
        ue, ut, um = (te, tt, tm) if negative is None else (rep(_fit(v, b)) for v in negative)
        uncond_drop = negative is None
        diffusion = self.diffusion.respaced(steps)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if scale == 1.0:
                return self(x, t, te, tt, tm).float()
            cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
            drop = torch.zeros(2 * len(x), dtype=torch.bool, device=x.device)
            drop[len(x) :] = uncond_drop
            out = self(cat(x, x), cat(t, t), cat(te, ue), cat(tt, ut), cat(tm, um), drop).float()
            return diffusion.guide(out[: len(x)], out[len(x) :], scale)

        x = diffusion.sample(
            model_fn, (b * n, self.embed_dim), generator=generator, device=text_embed.device, on_step=on_step
        )
        candidates = self.denormalize_image(x).view(b, n, -1)
        scores = (candidates * F.normalize(text_embed.float(), dim=-1)[:, None]).sum(-1)  # (B, N)
        return candidates[torch.arange(b, device=x.device), scores.argmax(dim=1)]

    # --- Analytic-DPM -------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_x0_error(
        self, batches: Iterable[tuple[torch.Tensor, Any]], steps: str | None = None, generator: Generators = None
    ) -> dict[str, Any]:
        """The model's x0 error at each sampling step on (raw image embeddings, TextEncoding) batches of
        training data, kept with the prior (and so in its export): with diffusion.variance=analytic,
        sampling then uses Analytic-DPM's optimal variance (unCLIP's choice for its 64-step prior)."""
        diffusion = self.diffusion.respaced(steps)
        total, count = np.zeros(diffusion.num_steps), 0
        for image, text in batches:
            x0 = self.normalize_image(image)

            def model_fn(x: torch.Tensor, t: torch.Tensor, text=text) -> torch.Tensor:
                return self(x, t, text.embedding, text.tokens, text.mask)

            total += diffusion.measure_x0_error(model_fn, x0, generator) * len(x0)
            count += len(x0)
        if count == 0:
            raise ValueError("no data to measure the prior's x0 error on")
        estimate = {"timesteps": diffusion.timesteps.tolist(), "x0_mse": (total / count).tolist(), "samples": count}
        self.set_x0_error(estimate)
        return estimate

    def set_x0_error(self, estimate: dict[str, Any] | None) -> None:
        self.x0_error = estimate
        self.diffusion = Diffusion(self.cfg.diffusion, x0_error=estimate)

    def export_config(self) -> dict[str, Any]:
        return {
            "kind": "prior",
            "prior": asdict(self.cfg),
            "embed_dim": self.embed_dim,
            "text_width": self.text_width,
            "context_length": self.context_length,
            "x0_error": self.x0_error,
        }


def _fit(v: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """One negative caption's tensors broadcast to b captions (or b given ones kept)."""
    return v if v is None or len(v) == b else v.expand(b, *v.shape[1:])


def prior_from_config(config: dict[str, Any], where: str = "config") -> DiffusionPrior:
    """A prior built from an export config; every key and type of its record checked (unclip.records)."""
    cfg = from_record(PriorConfig, config["prior"], f"{where}: prior")
    prior = DiffusionPrior(cfg, config["embed_dim"], config["text_width"], config["context_length"])
    prior.set_x0_error(config.get("x0_error"))
    return prior


def load_prior(folder: str | Path, device: str | torch.device = "cpu") -> DiffusionPrior:
    """A prior from a training export (runs/<name>/export), in eval mode."""
    weights, config = read_export(folder, kind="prior")
    prior = prior_from_config(config, str(Path(folder) / CONFIG))
    try:
        prior.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the weights do not fit the exported prior config: {e}") from e
    return prior.to(device).eval()
