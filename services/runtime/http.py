"""A small ASGI router for the query API, and JSON helpers."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from urllib.parse import parse_qs, unquote
from uuid import UUID

import structlog
from faststream.asgi.types import Receive, Scope, Send

log = structlog.get_logger("bianzhi.http")


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def int_arg(self, name: str, default: int, *, low: int = 0, high: int = 10_000) -> int:
        raw = self.arg(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError(400, "invalid_query", f"{name} must be a whole number") from None
        if not low <= value <= high:
            raise HttpError(400, "invalid_query", f"{name} must be between {low} and {high}")
        return value

    def bool_arg(self, name: str, default: bool = False) -> bool:
        raw = self.arg(name)
        if raw is None or raw == "":
            return default
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise HttpError(400, "invalid_query", f"{name} must be true or false")

    def date_arg(self, name: str) -> date | None:
        raw = self.arg(name)
        if not raw:
            return None
        try:
            return date.fromisoformat(raw)
        except ValueError:
            raise HttpError(400, "invalid_query", f"{name} must be a date YYYY-MM-DD") from None

    def uuid_param(self, name: str) -> UUID:
        try:
            return UUID(self.params[name])
        except ValueError:
            raise HttpError(400, "invalid_path", f"{name} must be a UUID") from None


Handler = Callable[[Request], Awaitable[tuple[int, Any]]]


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, default=_default).encode()


async def send_response(
    send: Send, status: int, body: bytes, content_type: str = "application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Router:
    """GET routes with ``{name}`` path parameters."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], Handler]] = []

    def get(self, pattern: str) -> Callable[[Handler], Handler]:
        regex = re.compile(
            "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern.rstrip("/")) + "/?$"
        )

        def register(handler: Handler) -> Handler:
            self._routes.append((regex, handler))
            return handler

        return register

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Match the path as sent, so that an encoded "/" (%2F) inside a parameter (a notice
        # number such as 冀编用〔2026〕1/2号) stays inside it; decode each parameter after.
        raw: bytes | None = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else scope["path"]
        for regex, handler in self._routes:
            match = regex.match(path)
            if match is None:
                continue
            if scope["method"] not in ("GET", "HEAD"):
                await send_response(send, 405, json_bytes({"error": "method_not_allowed"}))
                return
            params = match.groupdict()
            if raw:
                params = {k: unquote(v) for k, v in params.items()}
            request = Request(
                path=scope["path"],
                params=params,
                query=parse_qs(scope.get("query_string", b"").decode()),
            )
            try:
                status, payload = await handler(request)
            except HttpError as exc:
                status, payload = exc.status, {"error": exc.code, "message": exc.message}
            except Exception:
                log.exception("query failed", path=path)
                status, payload = 500, {"error": "internal", "message": "internal error"}
            await send_response(send, status, json_bytes(payload))
            return
        await send_response(send, 404, json_bytes({"error": "not_found", "path": path}))
