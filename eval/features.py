"""Feature extractors for the Frechet distances: Inception-v3 (FID) and CLIP (FD-CLIP), plus the resize
protocol both real and generated images go through.

FID uses the Inception-v3 pool features (2048-d) of TensorFlow's 2015-12-05 graph, as ported by
torch-fidelity (which torchmetrics also uses): `weights-inception-2015-12-05-6726825d.pth`. Nothing
is downloaded: the file comes from a local path, its SHA-256 is checked, and it is read with
`torch.load(weights_only=True)` (torch-fidelity itself unpickles whatever file it is given).

Resizing to the extractor's input moves FID by points (Parmar et al. 2022, clean-fid), so it is
explicit, applied identically to real and generated images, and named in every report:
- `tf_bilinear`: the classic FID protocol (TensorFlow 1.x bilinear, no antialiasing), as the original
  FID code, torch-fidelity and torchmetrics < 1.8 do; comparable with published numbers such as
  unCLIP's 10.39 on MS-COCO;
- `pil_bicubic`: PIL's antialiased bicubic, as clean-fid's "clean" mode resizes, but to uint8 (clean-fid
  keeps each channel in float; torch-fidelity's extractor takes uint8), so not clean-fid's figures exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.export import load_torch_weights
from unclip.provenance import file_sha256

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# The file's full SHA-256 could not be read on the offline machine this was written on (the name's
# 6726825d is not documented as a hash prefix). Every report records the hash of the file used; pin it
# with eval.inception.sha256 so a different file is refused.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
RESIZES = ("tf_bilinear", "pil_bicubic")


@dataclass
class InceptionConfig:
    weights: str | None = None  # local path of weights-inception-2015-12-05-6726825d.pth (None: FID is skipped)
    sha256: str | None = None  # the SHA-256 the file must have; null: any file (its hash goes in the report)
    resize: str = "tf_bilinear"  # tf_bilinear (classic FID) | pil_bicubic (clean-fid) to 299 px


def resize_uint8(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size) by the named protocol."""
    if mode not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {mode!r}")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if mode == "pil_bicubic":
        out = [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
            for im in images.permute(0, 2, 3, 1).cpu().numpy()
        ]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(size, size), align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


class Inception:
    """Inception-v3 pool features of uint8 images, after the configured resize to 299."""

    dim = 2048

    def __init__(self, cfg: InceptionConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        path = Path(cfg.weights or "")
        if not cfg.weights or not path.is_file():
            raise FileNotFoundError(
                f"no Inception weights at {cfg.weights!r}. FID needs {INCEPTION_FILE}, torch-fidelity's port of "
                f"TensorFlow's FID Inception (also what torchmetrics uses): download it once where the network "
                f"allows ({INCEPTION_URL}), put it anywhere, and set eval.inception.weights=/path/to/{INCEPTION_FILE}"
                + (f" (it must have SHA-256 {cfg.sha256})" if cfg.sha256 else "")
                + ". Without it, run with eval.fid=false: FD-CLIP and the CLIP score need no download."
            )
        self.sha256 = file_sha256(path)
        if cfg.sha256 and self.sha256 != cfg.sha256:
            raise ValueError(
                f"{path} has SHA-256 {self.sha256}, not the pinned {cfg.sha256}: another file gives FIDs no one "
                "can compare with. Use the pinned file, or change eval.inception.sha256."
            )
        state = load_torch_weights(path, "Inception weights")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} holds no state dict of tensors: it is not the FID Inception's weights")
        self.model = build_inception(state, path).to(device)
        self.device = device

    @property
    def name(self) -> str:
        return f"inception-v3-2015-12-05 (torch-fidelity port, sha256 {self.sha256[:12]}), resize {self.cfg.resize} 299"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # tf_bilinear: torch-fidelity's extractor resizes uint8 images itself, in float (what the FID code
        # does); resizing here first would round to uint8 in between. pil_bicubic resizes here, to uint8
        # (clean-fid resizes each channel in float: its figures and these differ by that rounding).
        x = images if self.cfg.resize == "tf_bilinear" else resize_uint8(images, 299, self.cfg.resize)
        (features,) = self.model(x.to(self.device))
        return features.double().cpu()


def build_inception(state_dict: dict[str, torch.Tensor], path: Path | str = "the Inception weights"):
    """torch-fidelity's FeatureExtractorInceptionV3 with these weights. It reads its weights with
    pickle from a path or file object, so it gets our already-safely-loaded tensors re-serialized."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} does not fit torch-fidelity's InceptionV3: {first}") from None


class ClipFeatures:
    """Unit-norm CLIP image embeddings of uint8 images: FD-CLIP's features (Kynkaanniemi et al. 2023)
    and half of the CLIP score. The CLIP does its own resize to its input size (antialiased bicubic)."""

    def __init__(self, clip, label: str):
        self.clip = clip
        self.dim = clip.embed_dim
        self.label = label
        self.device = next(clip.parameters()).device

    @property
    def name(self) -> str:
        return f"CLIP {self.label} (fingerprint {self.clip.fingerprint()}), image embedding, unit norm"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.device).float() / 127.5 - 1
        return F.normalize(self.clip.encode_image(pixels).double(), dim=-1).cpu()

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.clip.encode_captions(captions).embedding.double(), dim=-1).cpu()


def load_clip(spec: str, device: torch.device | str = "cpu"):
    """An independent CLIP for scoring: a train.clip export folder, a conf/model/clip preset with an
    optional local checkpoint (ViT-L-14:/models/ViT-L-14.pt), or an open_clip architecture name with one."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from unclip.clip import ClipConfig, build_clip

    if Path(spec).is_dir():
        cfg = ClipConfig(checkpoint=spec)
    else:
        name, _, checkpoint = spec.partition(":")
        preset = Path(__file__).resolve().parent.parent / "conf" / "model" / "clip" / f"{name}.yaml"
        base = (
            ClipConfig(**OmegaConf.to_container(OmegaConf.load(preset))) if preset.is_file() else ClipConfig(arch=name)
        )
        cfg = replace(base, checkpoint=checkpoint or base.checkpoint)
    return build_clip(replace(cfg, frozen=True), device)
