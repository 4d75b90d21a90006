"""python -m unclip.serve against the official `openai` client, live, on a tiny random stack: every
endpoint, both response formats, edits that keep what they should, every error with its status and
OpenAI's shape, a full queue, 20 concurrent requests, and a client that goes away."""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the official openai client (the dev extra pins it)")

from tests.helpers import png_header, random_image  # noqa: E402
from tests.serve_helpers import Gate, running, stack_app  # noqa: E402


@pytest.fixture(scope="module")
def server(stack):
    app = stack_app(stack, capacity=32, max_images=8, max_upload_mb=1)
    with running(app) as url:
        yield url, app


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))


def scene(size: int = 64) -> np.ndarray:
    return random_image(np.random.default_rng(size), size)


# --- the endpoints ------------------------------------------------------------------------------------
def test_generations_in_both_formats_with_provenance(server):
    url, _ = server
    api = client(url)
    out = api.images.generate(
        prompt="a red circle", n=3, size="64x64", response_format="b64_json", extra_body={"seed": 7}
    )
    assert len(out.data) == 3 and all(pixels(d).shape == (64, 64, 3) for d in out.data)
    record = json.loads(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).text["unclip"])
    assert record["prompt"] == "a red circle" and record["seed"] == 7 and record["mode"] == "text"
    assert [d.model_extra["seed"] for d in out.data] == [7, 8, 9]
    by_url = api.images.generate(
        prompt="a red circle", n=1, size="64x64", response_format="url", extra_body={"seed": 7}
    )
    served = httpx.get(by_url.data[0].url)
    assert served.headers["content-type"] == "image/png"
    from_url = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB")).astype(int)
    assert np.abs(from_url - pixels(out.data[0])).max() <= 2  # its seed's image: 1 in a batch of 3, then alone
    models = api.models.list()
    assert models.data[0].id == "unclip" and models.data[0].model_extra["sizes"] == ["16x16", "64x64", "256x256"]


def test_an_edit_with_a_mask_keeps_every_pixel_outside_it(server):
    url, _ = server
    image = scene(64)
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[16:40, 20:44, 3] = 0  # transparent: repaint
    out = client(url).images.edit(
        image=("scene.png", png(image)),
        mask=("mask.png", png(mask, "RGBA")),
        prompt="a yellow star",
        n=2,
        size="64x64",
        response_format="b64_json",
    )
    kept = mask[:, :, 3] == 255
    for item in out.data:
        got = pixels(item)
        assert np.array_equal(got[kept], image[kept])
        assert not np.array_equal(got[~kept], image[~kept])


def test_outpainting_through_an_edit_keeps_the_image_and_fills_its_border(server):
    """What DALL-E 2's API users do: the image, smaller, in the middle of a transparent square."""
    url, _ = server
    canvas = np.zeros((64, 64, 4), np.uint8)
    canvas[16:48, 16:48, :3] = scene(32)
    canvas[16:48, 16:48, 3] = 255
    out = client(url).images.edit(
        image=("frame.png", png(canvas, "RGBA")), prompt="a red circle", size="64x64", response_format="b64_json"
    )
    got = pixels(out.data[0])
    assert np.array_equal(got[16:48, 16:48], canvas[16:48, 16:48, :3])
    assert got[:8].std() > 0  # the border was painted, not left empty


def test_variations(server):
    url, _ = server
    out = client(url).images.create_variation(image=("scene.png", png(scene(64))), n=2, size="64x64")
    assert len(out.data) == 2 and all(d.url.endswith(".png") for d in out.data)


# --- errors ---------------------------------------------------------------------------------------------
def _fails(call, status: int, code=None, param=None, match: str = ""):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value
    assert error.status_code == status, (error.status_code, error.body)
    assert set(error.body) == {"message", "type", "param", "code"}, error.body  # OpenAI's shape
    assert code is None or error.body["code"] == code, error.body
    assert param is None or error.body["param"] == param, error.body
    assert match in error.body["message"], error.body
    return error


def test_every_bad_request_is_a_400_in_openais_shape_and_the_server_goes_on(server):
    url, _ = server
    api = client(url)
    edit = lambda **kw: api.images.edit(**({"prompt": "a star", "size": "64x64"} | kw))  # noqa: E731
    square, rgba = png(scene(64)), np.full((64, 64, 4), 255, np.uint8)
    rgba[:8, :8, 3] = 0
    _fails(lambda: api.images.generate(prompt="x", size="512x512"), 400, None, "size", "makes 16x16, 64x64, 256x256")
    _fails(lambda: api.images.generate(prompt="x", n=11), 400, None, "n", "from 1 to 10")
    _fails(lambda: api.images.generate(prompt="x" * 1001), 400, None, "prompt", "limit is 1000")
    _fails(lambda: api.images.generate(prompt="x", extra_body={"decoder_guidance": "nan"}), 400, None, None, "finite")
    _fails(lambda: edit(image=("a.jpg", b"\xff\xd8not a png")), 400, None, "image", "must be a PNG")
    _fails(lambda: edit(image=("a.png", png(scene(64)[:, :40].copy()))), 400, None, "image", "must be square")
    _fails(lambda: edit(image=("a.png", square), mask=("m.png", png(rgba[:32, :32].copy(), "RGBA"))), 400, None, "mask")
    _fails(lambda: edit(image=("a.png", square), mask=("m.png", png(scene(64)))), 400, None, "mask", "alpha channel")
    _fails(lambda: edit(image=("a.png", square)), 400, None, "image", "transparent")
    for refused in (
        lambda: api.images.generate(prompt="a nude figure"),
        lambda: edit(image=("a.png", png(rgba, "RGBA")), prompt="nude"),
        lambda: api.images.create_variation(image=("a.png", square), extra_body={"prompt": "a nude"}),
    ):
        _fails(refused, 400, "content_policy_violation", "prompt", "prompt filter")
    bad_json = httpx.post(f"{url}/v1/images/generations", content=b"{not json")
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"
    assert len(api.images.generate(prompt="a red circle", size="16x16").data) == 1  # still serving


def test_uploads_over_the_limit_and_bombs_are_413_before_decoding(server):
    url, _ = server
    api = client(url)
    big = np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)  # ~1.5 MB of noise
    _fails(lambda: api.images.create_variation(image=("big.png", png(big))), 413, "request_too_large")
    _fails(lambda: api.images.create_variation(image=("bomb.png", png_header(20000, 20000))), 413, "request_too_large")


def test_a_key_is_required_when_set(stack):
    with running(stack_app(stack, api_key="s3cret")) as url:
        _fails(lambda: client(url, "wrong").images.generate(prompt="x", size="16x16"), 401, "invalid_api_key")
        assert len(client(url, "s3cret").images.generate(prompt="a red circle", size="16x16").data) == 1


# --- the queue ------------------------------------------------------------------------------------------
def test_a_full_queue_is_answered_at_once_with_retry_after(stack):
    app = stack_app(stack, capacity=1)
    with running(app) as url:
        gate = Gate(app)
        api = client(url)
        with ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(api.images.generate, prompt="a red circle", size="16x16")
            assert gate.entered.wait(30)  # the first is inside the model, holding it
            waiting_one = pool.submit(api.images.generate, prompt="a blue square", size="16x16")
            _wait_for(lambda: app.state.worker.waiting)
            error = _fails(lambda: api.images.generate(prompt="a star", size="16x16"), 503, "queue_full")
            assert int(error.response.headers["retry-after"]) >= 1
            gate.open()
            assert len(running_one.result(60).data) == 1 and len(waiting_one.result(60).data) == 1


def test_a_client_that_goes_away_frees_its_place(stack):
    app = stack_app(stack, capacity=1)
    with running(app) as url:
        gate = Gate(app)
        worker = app.state.worker
        holding = threading.Thread(target=lambda: _quietly(client(url).images.generate, prompt="held", size="16x16"))
        holding.start()
        assert gate.entered.wait(30)
        with pytest.raises(httpx.TimeoutException):  # waits in the queue, then gives up
            httpx.post(f"{url}/v1/images/generations", json={"prompt": "impatient", "size": "16x16"}, timeout=1.0)
        _wait_for(lambda: not worker.waiting)  # its place is free again
        other = threading.Thread(target=lambda: _quietly(client(url).images.generate, prompt="next", size="16x16"))
        other.start()
        _wait_for(lambda: worker.waiting)  # admitted: the queue of one had room
        gate.open()
        holding.join(60)
        other.join(60)
        assert next(worker.batches) == 2  # the held one and the next ran; the impatient one never did


def test_twenty_concurrent_requests_all_complete_and_seeds_hold_in_a_batch(server):
    url, app = server
    api = client(url)
    alone = {s: pixels(api.images.generate(prompt=f"scene {s}", size="64x64", response_format="b64_json",
                                           extra_body={"seed": s}).data[0]) for s in (3, 5)}  # fmt: skip
    batches_before = next(app.state.worker.batches)

    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[:32, :32, 3] = 0

    def one(k: int):
        if k % 4 == 3:
            return "variation", api.images.create_variation(image=("s.png", png(scene(64))), size="64x64", n=1)
        if k % 6 == 5:
            edit = api.images.edit(image=("s.png", png(scene(64))), mask=("m.png", png(mask, "RGBA")), prompt="a star")
            return "edit", edit
        seed = (3, 5)[k % 2] if k < 8 else 100 + k
        out = api.images.generate(
            prompt=f"scene {seed}", n=2, size="64x64", response_format="b64_json", extra_body={"seed": seed}
        )
        return seed, out

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert len(results) == 20
    for tag, out in results:
        if tag in ("variation", "edit"):
            assert len(out.data) == 1
            continue
        assert [d.model_extra["seed"] for d in out.data] == [tag, tag + 1]  # none lost, none another's
        if tag in alone:
            # the same image alone or batched, to float rounding (as tests/test_pipeline.py holds the pipeline)
            assert np.abs(pixels(out.data[0]).astype(int) - alone[tag]).max() <= 2
    generations = sum(1 for tag, _ in results if tag not in ("variation", "edit"))
    assert {tag for tag, _ in results} >= {"variation", "edit"}
    assert next(app.state.worker.batches) - batches_before - 1 < generations + 5  # generations were batched


def _wait_for(predicate, timeout: float = 30.0) -> None:
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _quietly(fn, **kw):
    try:
        return fn(**kw)
    except Exception:  # noqa: BLE001 - the thread's result is not what the test checks
        return None
