"""A live server for the serving tests: the app on a free port of 127.0.0.1, in a thread of the test
process (uvicorn, as `python -m unclip.serve` runs it), over a tiny random stack."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from unclip.pipeline import Pipeline
from unclip.serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def stack_app(stack: dict, **kw):
    """The app over the tiny stack's prior, decoder and both upsamplers (16, 64 and 256 px)."""
    pipe = Pipeline.from_exports(
        prior=stack["prior"], decoder=stack["decoder"], up256=stack["up256"], up1024=stack["up1024"], progress=False
    )
    return create_app(pipe, **kw)


class Gate:
    """Holds the model worker inside its first reverse step until opened: how the tests fill the
    queue or leave a client waiting, without timing races."""

    def __init__(self, app):
        self.open_event = threading.Event()
        self.entered = threading.Event()
        steps = app.state.worker.pipe.steps
        self.steps, self.listener = steps, steps.listener

        def held(*args):
            self.entered.set()
            self.open_event.wait(timeout=60)
            return self.listener(*args)

        steps.listener = held

    def open(self) -> None:
        self.open_event.set()
        self.steps.listener = self.listener
