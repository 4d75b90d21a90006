"""The routes: OpenAI's Images API for DALL-E 2 (generations, edits, variations, models), the image
files its `url` responses point to, the progress of a request (for the editor), and the editor.

Each route parses and checks its request (inputs.py), runs the prompt filter, hands a Job to the one
model worker (worker.py) and waits for it, watching for the client going away."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import time
from collections import OrderedDict
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from unclip.serve import inputs
from unclip.serve.calls import with_size
from unclip.serve.errors import APIError, bad_request, queue_full, refused, server_error, too_large, unauthorized
from unclip.serve.worker import Cancelled, Job, QueueFull, Worker

REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ImageFiles:
    """The PNGs `url` responses point to, kept in memory for an hour (as OpenAI keeps its URLs), at
    most `limit` of them."""

    def __init__(self, limit: int = 512, keep_s: float = 3600.0):
        self.files: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.limit, self.keep_s = limit, keep_s

    def add(self, data: bytes) -> str:
        name = secrets.token_hex(12)
        self.files[name] = (time.time(), data)
        while len(self.files) > self.limit or (
            self.files and time.time() - next(iter(self.files.values()))[0] > self.keep_s
        ):
            self.files.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        found = self.files.get(name)
        return None if found is None or time.time() - found[0] > self.keep_s else found[1]


def create_app(
    pipe,
    *,
    api_key: str | None = None,
    model_name: str = "unclip",
    capacity: int = 16,
    max_images: int = 16,
    max_upload_mb: float = 4.0,
    watermark: bool = True,
) -> FastAPI:
    """The app over a loaded Pipeline; its worker thread starts with the app and stops with it."""
    worker = Worker(pipe, capacity=capacity, max_images=max_images)
    sizes = inputs.served_sizes(pipe)
    files = ImageFiles()
    max_bytes = int(max_upload_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_app):  # the worker thread lives as long as the app serves
        worker.start()
        yield
        worker.stop()

    app = FastAPI(
        title="unclip Images API",
        description="OpenAI's Images API (DALL-E 2) over a trained unCLIP stack",
        lifespan=lifespan,
    )
    app.state.worker = worker

    _install_error_handlers(app)

    app.add_middleware(Guard, api_key=api_key, max_upload_mb=max_upload_mb)

    def check_model(value: Any) -> None:
        if value not in (None, "", model_name, "dall-e-2"):
            raise bad_request(f"model {value!r} is not served here; this server serves {model_name!r}", "model")

    def check_prompt(prompt: str | None, param: str = "prompt") -> None:
        if prompt is not None and pipe.prompt_filter is not None:
            reason = pipe.prompt_filter.check(prompt)
            if reason:
                raise refused(prompt, reason, param)

    def new_job(request: Request, kind: str, args: dict[str, Any], body: dict[str, Any]) -> Job:
        settings = inputs.sample_settings(body)
        if body.get("seed") in (None, ""):  # no seed asked for: a fresh one, as every call to OpenAI's API differs
            settings.seed = secrets.randbelow(2**31)
        job = Job(
            kind,
            args | {"watermark": watermark, "user": body.get("user")},
            with_size(settings, args["size"], max_images),
        )
        wanted = request.headers.get("x-request-id", "")
        if REQUEST_ID.fullmatch(wanted) and wanted not in worker.jobs:
            job.id = wanted  # the editor polls /v1/images/progress/<its id>
        return job

    async def answer(request: Request, job: Job, response_format: str) -> Response:
        try:
            worker.submit(job)
        except QueueFull as e:
            raise queue_full(int(e.args[0])) from None
        waiting = asyncio.wrap_future(job.result)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                worker.cancel(job)  # its place in the queue is free now; a running batch stops at its next step
                return Response(status_code=499)
        try:
            images = waiting.result()
        except (Cancelled, asyncio.CancelledError):
            return Response(status_code=499)
        except ValueError as e:  # the pipeline's own checks (a refused prompt, settings it cannot run)
            raise bad_request(str(e)) from None
        except Exception as e:  # noqa: BLE001 - one failed request, never a stopped server
            raise server_error(f"generation failed: {type(e).__name__}: {e}") from None
        data = []
        for image in images:
            item: dict[str, Any] = {"revised_prompt": None, "seed": image["seed"]}
            if image.get("notes"):
                item["notes"] = image["notes"]  # what was not done as asked (a prompt cut to the CLIP's context, ...)
            if response_format == "b64_json":
                item["b64_json"] = base64.b64encode(image["png"]).decode()
            else:
                item["url"] = str(request.url_for("image_file", name=files.add(image["png"])))
            data.append(item)
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        check_model(body.get("model"))
        prompt = inputs.parse_prompt(body.get("prompt"), required=True)
        check_prompt(prompt)
        args = {
            "prompt": prompt,
            "n": inputs.parse_n(body.get("n")),
            "size": inputs.parse_size(body.get("size"), sizes),
        }
        job = new_job(request, "generation", args, body)
        return await answer(request, job, inputs.parse_response_format(body.get("response_format")))

    async def form_of(request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - a body that is not multipart form data
            raise bad_request(f"the body must be multipart/form-data ({e})") from None
        fields, uploads = {}, {}
        for key, value in form.multi_items():
            key = key.removesuffix("[]")
            if hasattr(value, "read"):
                uploads[key] = await value.read()
            else:
                fields[key] = value
        return fields, uploads

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        body, uploads = await form_of(request)
        check_model(body.get("model"))
        prompt = inputs.parse_prompt(body.get("prompt"), required=True)
        check_prompt(prompt)
        if "image" not in uploads:
            raise bad_request("an image is required (a square PNG)", "image")
        image = inputs.read_png(uploads["image"], "image", max_bytes)
        mask = inputs.read_png(uploads["mask"], "mask", max_bytes) if "mask" in uploads else None
        args = {
            "image": image.convert("RGBA") if inputs.has_alpha(image) else image.convert("RGB"),
            "mask": inputs.edit_mask(image, mask),
            "prompt": prompt,
            "n": inputs.parse_n(body.get("n")),
            "size": inputs.parse_size(body.get("size"), sizes),
        }
        return await answer(
            request, new_job(request, "edit", args, body), inputs.parse_response_format(body.get("response_format"))
        )

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> Response:
        body, uploads = await form_of(request)
        check_model(body.get("model"))
        prompt = inputs.parse_prompt(body.get("prompt"), required=False)  # an extension: also follow a caption
        check_prompt(prompt)
        if "image" not in uploads:
            raise bad_request("an image is required (a square PNG)", "image")
        image = inputs.read_png(uploads["image"], "image", max_bytes)
        args = {"image": image.convert("RGB"), "prompt": prompt, "n": inputs.parse_n(body.get("n"))}
        args["size"] = inputs.parse_size(body.get("size"), sizes)
        return await answer(
            request,
            new_job(request, "variation", args, body),
            inputs.parse_response_format(body.get("response_format")),
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        exports = {name: {"path": info.path, "run": info.run, "step": info.step} for name, info in pipe.exports.items()}
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "unclip"}
        return {"object": "list", "data": [card | {"sizes": [f"{s}x{s}" for s in sizes], "exports": exports}]}

    @app.get("/v1/images/files/{name}.png", name="image_file")
    async def image_file(name: str) -> Response:
        data = files.get(name)
        if data is None:
            raise APIError(404, f"no image {name}.png here (image URLs last an hour)", code="not_found")
        return Response(data, media_type="image/png")

    @app.get("/v1/images/progress/{job_id}")
    async def progress(job_id: str) -> dict[str, Any]:
        found = worker.status(job_id)
        if found is None:
            raise APIError(404, f"no request {job_id} (ids last ten minutes)", code="not_found")
        return found

    static = resources.files("unclip.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/")
    async def editor() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    return app


class Guard:
    """The key first, then the upload's declared size: nothing is read of a refused request. Plain
    ASGI (not Starlette's BaseHTTPMiddleware, which hides a client's disconnect from the routes)."""

    def __init__(self, app, api_key: str | None, max_upload_mb: float):
        self.app, self.api_key, self.max_upload_mb = app, api_key, max_upload_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            try:
                self.check(scope["path"], {k.decode().lower(): v.decode() for k, v in scope["headers"]})
            except APIError as e:
                await _error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, path: str, headers: dict[str, str]) -> None:
        guarded = path.startswith("/v1/") and not path.startswith("/v1/images/files/")  # URLs carry no key
        if self.api_key and guarded and headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise unauthorized()
        declared = int(headers.get("content-length") or 0)
        if declared > 2 * self.max_upload_mb * 2**20 + 2**16:  # an image and a mask, and the form around them
            mb = declared / 2**20
            raise too_large(f"the request is {mb:.1f} MB; uploads are limited to {self.max_upload_mb:g} MB each")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation, Starlette's 404 / 405, and anything else."""

    @app.exception_handler(APIError)
    async def _api(_request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, e: RequestValidationError):
        return _error_response(bad_request(f"invalid request: {e.errors()[:3]}"))

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return _error_response(
            APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        )

    @app.exception_handler(Exception)
    async def _crash(_request, e: Exception):
        return _error_response(server_error(f"{type(e).__name__}: {e}"))
