"""The GLIDE / ADM U-Net, conditioned as unCLIP's decoder, or fully convolutional as its upsamplers.

ADM (Dhariwal & Nichol 2021): residual blocks with scale-shift norm (the timestep embedding sets a
per-channel scale and shift after the block's second GroupNorm), residual blocks that down- and
upsample, dropout, and attention at chosen resolutions with heads of a fixed channel count.
GLIDE adds encoder K/V: attention layers also attend to a context sequence.

unCLIP's decoder (sec. 2.1): the CLIP image embedding is projected and added to the timestep
embedding, and projected into 4 extra context tokens; caption tokens (CLIP's token outputs, or a
GLIDE text transformer's) are projected and join that context. Both conditionings are dropped
independently for classifier-free guidance, replaced by learned null embeddings.

Upsamplers: the low-resolution image, upsampled, is concatenated to the noisy input; no attention,
no caption, so the network is fully convolutional: trained on crops, applied at full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unclip.layers import TimestepMLP, attention, run_block, timestep_embedding


@dataclass
class UNetConfig:
    image_size: int = 64  # the resolution it is built for (attention resolutions refer to it)
    in_channels: int = 3
    out_channels: int = 3  # per prediction; doubled when the diffusion learns sigma
    model_channels: int = 192
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_res_blocks: int = 3
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])  # feature-map sides
    num_head_channels: int = 64  # heads by channel count (ADM)
    dropout: float = 0.1
    resblock_updown: bool = True  # BigGAN-style residual up/downsampling (ADM)
    input_patch: int = 1  # >1: space-to-depth stem (pixel unshuffle), for small CPU models
    # with input_patch > 1: the last convolution puts out this many channels per pixel, and a 3x3
    # convolution at full resolution maps them to the output, blending across the stem's cells, whose
    # pixels the last layer otherwise predicts apart (the cell grid in a tiny decoder's images); 0: none
    output_refine: int = 0
    spatial_embed: bool = False  # the image embedding also projected to a feature map added after the
    #                              stem: a small decoder learns shape templates from it in minutes
    spatial_embed_follows: bool = False  # the map moves to where the stem's features put the shape (a
    #                              soft-argmax): one template serves a shape wherever it stands
    # decoder conditioning
    clip_dim: int = 0  # CLIP image embedding width (0: no image conditioning)
    num_clip_tokens: int = 4  # the embedding projected into this many context tokens (unCLIP)
    text_width: int = 0  # width of caption token features (0: no caption)
    pooled_text: bool = True  # GLIDE: the caption's pooled feature (the encoder's output at its end
    #                           token) is also projected and added to the timestep embedding
    context_channels: int = 0  # width of the attention context (0: 4 x model_channels, GLIDE's xf_width)
    # upsampler conditioning
    low_res_channels: int = 0  # 3: the upsampled low-resolution image is concatenated to the input
    noise_level_cond: bool = False  # condition on the augmentation noise level of the low-res image
    # inpainting (GLIDE's fine-tune): masked image (3) + mask (1) as extra input channels
    inpaint: bool = False
    checkpointing: bool = False  # activation checkpointing per block: recompute in backward, keep less memory
    # padded caption tokens: mask (left out of attention: SDPA's memory-efficient kernel) | learned (replaced
    # by a learned padding embedding and attended to like any token, GLIDE's fixed-length context: no
    # mask, so flash attention)
    caption_padding: str = "mask"

    @property
    def context_dim(self) -> int:
        return self.context_channels or 4 * self.model_channels


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least fp32 whatever the activations' dtype (ADM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


def norm(channels: int) -> nn.GroupNorm:
    """ADM's 32 groups, or the largest count dividing the channels that does not exceed 32."""
    return GroupNorm32(math.gcd(32, channels), channels)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)): a ResBlock's pre-activation. A function of its own, so that the speed
    settings can hand it to torch.compile, which fuses the fp32 normalization, the activation and the
    casts into one kernel (train/speed.py, trainer.compile_scope=norm_act)."""
    return F.silu(norm(x))


def norm_modulate_silu(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x) * (1 + scale) + shift): the ResBlock's timestep-modulated activation (ADM)."""
    return F.silu(norm(x) * (1 + scale) + shift)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float, up=False, down=False):
        super().__init__()
        self.in_norm = norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.up, self.down = up, down
        self.emb = nn.Linear(emb_dim, 2 * out_channels)  # scale and shift
        self.out_norm = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        self.norm_act, self.norm_modulate_act = norm_silu, norm_modulate_silu  # compiled by trainer.compile_scope

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm_act(self.in_norm, x)
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm_modulate_act(self.out_norm, h, scale, shift)
        h = self.out_conv(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention; with a context, its K/V are prepended to the image's (GLIDE's encoder_kv)."""

    def __init__(self, channels: int, head_channels: int, context_dim: int = 0):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.encoder_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero(nn.Linear(channels, channels))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads, d = self.heads, c // self.heads
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, HW, C)
        # Projected as tokens so that the head dimension is innermost (stride 1): SDPA's fused kernels
        # (flash, memory-efficient) refuse anything else and would fall back to the quadratic-memory one.
        q, k, v = self.qkv(tokens).view(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)  # each (B, heads, HW, d)
        mask = None
        if self.encoder_kv is not None and context is not None:
            ek, ev = self.encoder_kv(context).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
            if context_mask is not None:
                spatial = torch.ones(b, hgt * wid, dtype=torch.bool, device=x.device)
                mask = torch.cat([context_mask, spatial], dim=1)[:, None, None, :]
        out = attention(q, k, v, mask)  # (B, heads, HW, d)
        out = self.proj(out.transpose(1, 2).reshape(b, -1, c))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class Block(nn.Sequential):
    """A step of the U-Net: residual blocks and attention, each given what it needs."""

    def forward(self, x, emb, context=None, context_mask=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, learn_sigma: bool = False):
        super().__init__()
        self.cfg = cfg
        mc, p = cfg.model_channels, cfg.input_patch
        emb_dim = 4 * mc
        in_ch = (cfg.in_channels + cfg.low_res_channels + (4 if cfg.inpaint else 0)) * p * p
        self.out_channels = cfg.out_channels * (2 if learn_sigma else 1)
        self.time_embed = TimestepMLP(emb_dim, features=mc)
        self._build_conditioning(cfg, emb_dim)
        ctx = cfg.context_dim if self.has_context else 0
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(in_ch, mc, 3, padding=1))])
        chans, ch, side = [mc], mc, cfg.image_size // p
        self.stem_side = side
        self.embed_map = nn.Linear(cfg.clip_dim, mc * side * side) if cfg.spatial_embed and cfg.clip_dim else None
        self.embed_place = None
        if cfg.spatial_embed_follows and self.embed_map is None:
            raise ValueError("unet.spatial_embed_follows moves the spatial_embed map: set unet.spatial_embed=true")
        if cfg.spatial_embed_follows:
            self.embed_place = nn.Sequential(  # dilated: 15 cells across, a big shape's whole width
                nn.Conv2d(mc, mc, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(mc, mc, 3, padding=2, dilation=2),
                nn.SiLU(),
                nn.Conv2d(mc, 1, 3, padding=4, dilation=4),
            )
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if side in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_head_channels, ctx))
                self.input_blocks.append(Block(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(self._down(ch, emb_dim, cfg)))
                chans.append(ch)
                side //= 2
        attention = bool(cfg.attention_resolutions)
        mid = [ResBlock(ch, emb_dim, ch, cfg.dropout)]
        if attention:
            mid.append(AttentionBlock(ch, cfg.num_head_channels, ctx))
        self.middle = Block(*mid, ResBlock(ch, emb_dim, ch, cfg.dropout))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if side in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_head_channels, ctx))
                if level and i == cfg.num_res_blocks:
                    layers.append(self._up(ch, emb_dim, cfg))
                    side *= 2
                self.output_blocks.append(Block(*layers))
        if cfg.output_refine and p == 1:
            raise ValueError("unet.output_refine blends the stem's cells: it needs unet.input_patch > 1")
        k = cfg.output_refine or self.out_channels  # channels per pixel out of the last convolution
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, k * p * p, 3, padding=1)))
        self.refine = (
            nn.Sequential(nn.SiLU(), nn.Conv2d(k, self.out_channels, 3, padding=1)) if cfg.output_refine else None
        )
        self.channels_last = False  # use_channels_last(): NHWC weights and activations

    def use_channels_last(self) -> UNet:
        """Weights and activations in NHWC, the layout cuDNN's and oneDNN's convolutions work in: no
        transposes around each convolution. In place; returns self."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    @staticmethod
    def _down(ch: int, emb_dim: int, cfg: UNetConfig) -> nn.Module:
        if cfg.resblock_updown:
            return ResBlock(ch, emb_dim, ch, cfg.dropout, down=True)
        return nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    @staticmethod
    def _up(ch: int, emb_dim: int, cfg: UNetConfig) -> nn.Module:
        if cfg.resblock_updown:
            return ResBlock(ch, emb_dim, ch, cfg.dropout, up=True)
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))

    def _build_conditioning(self, cfg: UNetConfig, emb_dim: int) -> None:
        self.has_context = bool(cfg.clip_dim or cfg.text_width) and bool(cfg.attention_resolutions)
        ctx = cfg.context_dim
        if cfg.clip_dim:
            self.null_image_embed = nn.Parameter(torch.randn(cfg.clip_dim) * 0.02)
            self.clip_to_emb = nn.Linear(cfg.clip_dim, emb_dim)
            self.clip_to_tokens = nn.Linear(cfg.clip_dim, cfg.num_clip_tokens * ctx) if self.has_context else None
        if cfg.text_width:
            self.text_proj = nn.Linear(cfg.text_width, ctx)
            self.null_text = nn.Parameter(torch.randn(ctx) * 0.02)
            if cfg.caption_padding not in ("mask", "learned"):
                raise ValueError(f"unet.caption_padding must be mask or learned, got {cfg.caption_padding!r}")
            if cfg.caption_padding == "learned":
                self.pad_text = nn.Parameter(torch.randn(ctx) * 0.02)
        self.text_to_emb = nn.Linear(cfg.text_width, emb_dim) if cfg.text_width and cfg.pooled_text else None
        if self.has_context:
            self.context_norm = nn.LayerNorm(ctx)
        if cfg.noise_level_cond:
            self.noise_level_embed = TimestepMLP(emb_dim, features=cfg.model_channels)

    def no_weight_decay(self) -> set[str]:
        return {"null_image_embed", "null_text", "pad_text"}

    def _pooled_text(self, tokens: torch.Tensor, mask: torch.Tensor | None, drop: torch.Tensor | None):
        """GLIDE's pooled caption: the encoder's output at the last real token (CLIP's and our text
        transformer's end-of-text), projected to the timestep embedding; nothing where dropped."""
        last = mask.sum(dim=1) - 1 if mask is not None else torch.full_like(tokens[:, 0, 0], tokens.shape[1] - 1)
        pooled = self.text_to_emb(tokens[torch.arange(len(tokens), device=tokens.device), last.long()])
        return pooled if drop is None else pooled.masked_fill(drop[:, None], 0)

    def _conditioning(self, emb, image_embed, text_tokens, text_mask, drop_image, drop_text, noise_level):
        """(timestep embedding + image embedding, attention context, its mask, spatial embedding map)."""
        b = emb.shape[0]
        dtype = emb.dtype
        tokens, masks = [], []
        embed_map = None
        if self.cfg.clip_dim:
            if image_embed is None:
                raise ValueError("this decoder is conditioned on CLIP image embeddings: pass image_embed")
            image = image_embed.to(dtype)
            if drop_image is not None:
                image = torch.where(drop_image[:, None], self.null_image_embed.to(dtype), image)
            emb = emb + self.clip_to_emb(image)
            if self.embed_map is not None:
                embed_map = self.embed_map(image).view(b, -1, self.stem_side, self.stem_side)
            if self.clip_to_tokens is not None:
                tokens.append(self.clip_to_tokens(image).reshape(b, self.cfg.num_clip_tokens, -1))
                masks.append(torch.ones(b, self.cfg.num_clip_tokens, dtype=torch.bool, device=emb.device))
        if self.cfg.text_width:
            if text_tokens is None:
                raise ValueError("this decoder reads caption tokens: pass text_tokens and text_mask")
            text = self.text_proj(text_tokens.to(dtype))
            mask = (
                text_mask if text_mask is not None else torch.ones(text.shape[:2], dtype=torch.bool, device=emb.device)
            )
            if self.text_to_emb is not None:
                emb = emb + self._pooled_text(text_tokens.to(dtype), text_mask, drop_text)
            if drop_text is not None:
                text = torch.where(drop_text[:, None, None], self.null_text.to(dtype), text)
                mask = mask | drop_text[:, None]
            if self.cfg.caption_padding == "learned":  # a fixed-length context: every position attended to
                text = torch.where(mask[:, :, None], text, self.pad_text.to(dtype))
                mask = None
            tokens.append(text)
            masks.append(mask)
        if self.cfg.noise_level_cond:
            level = torch.zeros(b, device=emb.device) if noise_level is None else noise_level
            emb = emb + self.noise_level_embed(level * 1000)
        if not self.has_context or not tokens:
            return emb, None, None, embed_map
        context = self.context_norm(torch.cat(tokens, dim=1))
        # only caption tokens can be padding; without them (or with learned padding) no mask, and SDPA may
        # use its flash kernel
        mask = torch.cat(masks, dim=1) if all(m is not None for m in masks) and self.cfg.text_width else None
        return emb, context, mask, embed_map

    def _placed(self, embed_map: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`embed_map`, learned centred, moved to the expected place of a heatmap the stem's features give
        (softmax over the cells): the template follows the shape the noisy image is turning into. The
        features enter as their difference from the image's mean, so a flat background scores alike."""
        b, _, side, _ = h.shape
        logits = self.embed_place(h - h.mean(dim=(2, 3), keepdim=True)).float().flatten(1)
        weights = logits.softmax(dim=1).view(b, side, side)
        cells = (torch.arange(side, device=h.device, dtype=torch.float32) * 2 + 1) / side - 1  # cell centres
        centre = torch.stack([(weights.sum(1) * cells).sum(1), (weights.sum(2) * cells).sum(1)], dim=1)  # (x, y)
        theta = torch.zeros(b, 2, 3, device=h.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = -centre  # output at p reads the template at p - centre
        grid = F.affine_grid(theta, list(embed_map.shape), align_corners=False)
        return F.grid_sample(embed_map.float(), grid, align_corners=False).to(embed_map.dtype)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        image_embed: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) noisy image; t (B,) original timesteps; image_embed (B, clip_dim);
        text_tokens (B, T, text_width) with text_mask (B, T); low_res (B, 3, H, W) already upsampled;
        inpaint_image (B, 3, H, W) with the hidden region zeroed and inpaint_mask (B, 1, H, W), 1 = known;
        drop_* (B,) True where that conditioning is replaced by its null embedding."""
        dtype = self.input_blocks[0][0].weight.dtype
        inputs = [x]
        if self.cfg.low_res_channels:
            if low_res is None:
                raise ValueError("this upsampler needs the low-resolution image: pass low_res")
            inputs.append(low_res)
        if self.cfg.inpaint:
            if inpaint_image is None or inpaint_mask is None:
                b, _, h, w = x.shape
                inpaint_image = x.new_zeros(b, 3, h, w)  # nothing known: plain generation
                inpaint_mask = x.new_zeros(b, 1, h, w)
            inputs += [inpaint_image * inpaint_mask, inpaint_mask]
        h = torch.cat(inputs, dim=1).to(dtype)
        if self.cfg.input_patch > 1:
            h = F.pixel_unshuffle(h, self.cfg.input_patch)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        emb = self.time_embed(t)
        emb, context, mask, embed_map = self._conditioning(
            emb, image_embed, text_tokens, text_mask, drop_image, drop_text, noise_level
        )
        skips = []
        ckpt = self.cfg.checkpointing
        for n, block in enumerate(self.input_blocks):
            h = run_block(block, h, emb, context, mask, checkpoint=ckpt and n > 0)
            if n == 0 and embed_map is not None:
                h = h + (embed_map if self.embed_place is None else self._placed(embed_map, h))
            skips.append(h)
        h = run_block(self.middle, h, emb, context, mask, checkpoint=ckpt)
        for block in self.output_blocks:
            h = run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context, mask, checkpoint=ckpt)
        out = self.out(h)
        if self.cfg.input_patch > 1:
            out = F.pixel_shuffle(out, self.cfg.input_patch)
        if self.refine is not None:
            out = self.refine(out)
        return out


__all__ = ["UNet", "UNetConfig", "timestep_embedding"]
