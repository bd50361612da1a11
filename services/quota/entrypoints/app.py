"""``uvicorn --factory services.quota.entrypoints.app:create_app``."""

from __future__ import annotations

from faststream.asgi import AsgiFastStream

from services.quota.bootstrap import build


def create_app() -> AsgiFastStream:
    return build().process_app()
