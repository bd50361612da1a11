"""The webhook channel: one signed POST of a CloudEvent, and what its answer means."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from contracts.envelope import CONTENT_TYPE
from services.notify.domain.model import Outcome, outcome_of_status, sign


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    status_code: int | None
    error: str | None


class WebhookSender:
    """POSTs signed CloudEvents; one shared connection pool, a timeout per request."""

    def __init__(self, *, timeout_s: float, max_connections: int) -> None:
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                ),
                follow_redirects=False,
                headers={"user-agent": "bianzhi-notify/1"},
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def post(self, *, url: str, secret: str, event_id: str, body: bytes) -> Attempt:
        if self._client is None:
            await self.start()
        assert self._client is not None
        timestamp = int(time.time())
        headers = {
            "content-type": CONTENT_TYPE,
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, timestamp, body),
        }
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return Attempt(
                Outcome.RETRY, None, f"timeout after {self.timeout_s}s ({type(exc).__name__})"
            )
        except httpx.HTTPError as exc:
            return Attempt(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}"[:1000])
        outcome = outcome_of_status(response.status_code)
        error = None
        if outcome is not Outcome.DELIVERED:
            error = f"HTTP {response.status_code}: {response.text[:500]}"
        return Attempt(outcome, response.status_code, error)
