"""The CLIP wrapper: shapes, token outputs that agree with open_clip, local loading, no downloads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from train.config import compose, to_object
from unclip.clip import ClipConfig, build_clip


@pytest.fixture(scope="module")
def tiny_cfg() -> ClipConfig:
    return to_object(compose("clip", ["model/clip=tiny"])).model.clip


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    torch.manual_seed(0)
    return build_clip(ClipConfig(**vars(tiny_cfg) | {"frozen": True}))


def test_shapes_and_token_outputs(tiny):
    captions = ["a red circle on a white background", "a small blue star above a big green square on a black one"]
    enc = tiny.encode_captions(captions)
    b, t = 2, tiny.context_length
    assert enc.tokens.shape == (b, t, tiny.text_width)
    assert enc.embedding.shape == (b, tiny.embed_dim)
    assert enc.mask.shape == (b, t) and enc.mask[:, 0].all()
    assert enc.mask[0].sum() < enc.mask[1].sum()  # the longer caption has more real tokens
    # the pooled embedding is exactly open_clip's own
    torch.testing.assert_close(enc.embedding, tiny.model.encode_text(tiny.tokenize(captions)))
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1  # any size: resized to the model's input
    assert tiny.encode_image(pixels).shape == (3, tiny.embed_dim)


def test_frozen_by_default(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loads_weights_from_a_local_file(tiny, tiny_cfg, tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = build_clip(ClipConfig(**vars(tiny_cfg) | {"checkpoint": str(path)}))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode_image(x), tiny.encode_image(x))
    assert loaded.fingerprint() == tiny.fingerprint()


def test_export_folder_round_trip(tiny, tmp_path):
    tiny.export(tmp_path / "export")
    loaded = build_clip(ClipConfig(checkpoint=str(tmp_path / "export")))
    tokens = tiny.tokenize(["a red circle"])
    torch.testing.assert_close(loaded.encode_text(tokens).tokens, tiny.encode_text(tokens).tokens)


def test_fingerprint_tells_clips_apart(tiny, tiny_cfg):
    torch.manual_seed(7)
    other = build_clip(tiny_cfg)
    assert other.fingerprint() != tiny.fingerprint()


def test_missing_checkpoint_and_downloads_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.clip.checkpoint"):
        build_clip(ClipConfig(arch="ViT-L-14", checkpoint=str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match="downloads are off"):
        build_clip(ClipConfig(arch="ViT-L-14", pretrained="openai"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_clip(ClipConfig(arch="ViT-Q-99"))


@pytest.mark.parametrize("preset,dim", [("ViT-L-14", 768), ("ViT-H-14", 1024)])
def test_public_presets_build_their_architecture_without_weights(preset, dim):
    cfg = to_object(compose("clip", [f"model/clip={preset}"])).model.clip
    assert cfg.arch == preset and cfg.checkpoint is None and not cfg.allow_download
    cfg.pretrained = None  # architecture only: random init on the meta device, no memory, no download
    with torch.device("meta"):
        clip = build_clip(cfg, device="meta")
    assert clip.embed_dim == dim and clip.context_length == 77


def test_the_convolutional_tiny_clip_embeds_64px_images_and_round_trips(tmp_path):
    """model/clip=tiny_resnet (the varied preset's candidate CLIP): a ModifiedResNet image tower at
    64 px whose export loads back to the same embeddings (the export record accepts its layer list)."""
    from open_clip.modified_resnet import ModifiedResNet

    cfg = to_object(compose("clip", ["model/clip=tiny_resnet"])).model.clip
    torch.manual_seed(0)
    clip = build_clip(ClipConfig(**vars(cfg) | {"frozen": True}))
    assert isinstance(clip.model.visual, ModifiedResNet) and clip.image_size == (64, 64)
    x = torch.rand(2, 3, 64, 64)
    clip.export(tmp_path / "export")
    loaded = build_clip(ClipConfig(checkpoint=str(tmp_path / "export")))
    torch.testing.assert_close(loaded.encode_image(x), clip.encode_image(x))
