"""Image-edit geometry (slerp, canvas extension, outpainting's tile plan) and the pipeline's image I/O
(mask conventions, the exact feathered paste), without any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.editing import extend_canvas, extension, plan_tiles, slerp
from unclip.images import box_mask, feather, load_image, load_mask, paste, resize_mask, to_uint8


def test_slerp_follows_the_great_circle():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([[0.5**0.5, 0.5**0.5, 0.0]]), atol=1e-6)
    third = slerp(a, b, 1 / 3)  # equal angles: 30 degrees from a
    assert torch.allclose(third, torch.tensor([[np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0]]).float(), atol=1e-6)
    assert torch.allclose(slerp(a, a, 0.3), a)  # parallel: no division by zero


def test_extension_per_side_and_to_an_aspect_ratio():
    assert extension(64, 64, {"left": 10, "top": 4}) == (10, 0, 4, 0)
    assert extension(64, 64, (1, 2, 3, 4)) == (1, 2, 3, 4)
    assert extension(64, 64, aspect="16:9") == (25, 25, 0, 0)  # 64 * 16/9 = 113.8 -> 114 wide
    assert extension(64, 64, aspect=0.5) == (0, 0, 32, 32)
    with pytest.raises(ValueError, match="already has aspect"):
        extension(90, 160, aspect="16:9")
    with pytest.raises(ValueError, match="either"):
        extension(64, 64)
    with pytest.raises(ValueError, match="sides are"):
        extension(64, 64, {"up": 3})
    with pytest.raises(ValueError, match="W:H"):
        extension(64, 64, aspect="wide")


def test_extended_canvas_places_the_image_and_marks_it_known():
    image = torch.rand(1, 3, 4, 6) * 2 - 1
    canvas, keep = extend_canvas(image, (2, 1, 3, 0))
    assert canvas.shape == (1, 3, 7, 9) and keep.shape == (1, 1, 7, 9)
    assert torch.equal(canvas[..., 3:7, 2:8], image)
    assert keep.sum() == 24 and keep[..., 3:7, 2:8].all()


@pytest.mark.parametrize("sides", [(64, 64, 0, 0), (0, 0, 100, 10), (40, 200, 30, 90)])
def test_tile_plan_covers_the_canvas_and_every_tile_grows_what_exists(sides):
    keep = extend_canvas(torch.zeros(1, 3, 64, 64), sides)[1][0, 0].numpy() > 0.5
    plan = plan_tiles(keep, 64, 32)
    known = keep.copy()
    for top, left in plan:
        window = known[top : top + 64, left : left + 64]
        assert window.shape == (64, 64)
        assert window.any() and not window.all()  # overlaps what exists, paints something new
        known[top : top + 64, left : left + 64] = True
    assert known.all()


def test_masks_follow_the_editors_conventions(tmp_path):
    white_paints = np.zeros((8, 8), np.uint8)
    white_paints[2:4, 2:4] = 255
    Image.fromarray(white_paints).save(tmp_path / "mask.png")
    keep = load_mask(tmp_path / "mask.png", (8, 8))
    assert keep[0, 0, 2:4, 2:4].sum() == 0 and keep.sum() == 60
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[5:, :, 3] = 0  # transparent bottom rows are painted (DALL-E's editor)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    keep = load_mask(tmp_path / "alpha.png", (8, 8))
    assert keep.shape == (1, 1, 8, 8) and keep[0, 0, 5:].sum() == 0 and keep[0, 0, :5].all()
    with pytest.raises(ValueError, match="the mask is 8x8 but the image is 16x16"):
        load_mask(tmp_path / "alpha.png", (16, 16))  # refused, not stretched
    with pytest.raises(ValueError, match="nothing to paint"):
        load_mask(np.ones((8, 8)), (8, 8))
    assert box_mask((8, 10), (1, 2, 5, 6))[0, 0, 2:6, 1:5].sum() == 0
    with pytest.raises(ValueError, match="not inside"):
        box_mask((8, 8), (0, 0, 9, 4))


def test_the_paste_keeps_the_original_exactly_and_feathers_inward():
    original = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    generated = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    keep = box_mask((16, 16), (4, 4, 12, 12))
    out = paste(original, generated, keep, pixels=3)
    kept = keep.bool().expand_as(out)
    assert torch.equal(out[kept], original.expand_as(out)[kept])
    weight = feather(keep, 3)[0, 0]
    assert weight[4, 8] == pytest.approx(0.75) and weight[5, 8] == pytest.approx(0.5) and weight[8, 8] == 0
    assert torch.equal(out[:, :, 8, 8], generated[:, :, 8, 8])  # deep inside: all generated


def test_images_load_from_files_arrays_and_tensors(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel; the rest transparent over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (1, 3, 4, 5)
    assert to_uint8(x)[0, :, 0, 0].tolist() == [200, 0, 0] and to_uint8(x)[0, :, 1, 1].tolist() == [255] * 3
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    assert resize_mask(box_mask((8, 8), (3, 3, 5, 5)), (4, 4))[0, 0].sum() == 12  # conservative: 4 cells touched
