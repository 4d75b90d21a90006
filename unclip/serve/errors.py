"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the status a client
of the Images API expects. Every failure a request can meet leaves through here, and the server
keeps serving after each one."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server answers with an error (not a crash)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def refused(prompt: str, reason: str, param: str = "prompt") -> APIError:
    """The prompt filter's refusal: OpenAI's code for it, so clients handle it as they already do."""
    return APIError(
        400,
        f"Your request was rejected by the prompt filter ({reason}).",
        param=param,
        code="content_policy_violation",
    )


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="request_too_large")


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' (the server's --api-key).",
        code="invalid_api_key",
    )


def queue_full(retry_after_s: int) -> APIError:
    return APIError(
        503,
        f"The server's queue is full; retry in about {retry_after_s} s.",
        kind="server_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def server_error(message: str) -> APIError:
    return APIError(500, message, kind="server_error", code="internal_error")
