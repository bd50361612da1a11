"""``OffsetGapGuard``: no record handed on past a hole in its partition.

Its own module, apart from ``services.runtime.broker``, so that the command-line clients that
read topics (``bianzhi send``, ``tail``, ``import``, ``demo``) use it without loading what the
services' broker module brings (FastStream, SQLAlchemy).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from services.runtime import metrics

log = structlog.get_logger("bianzhi.broker")


class OffsetGapGuard:
    """Hands on a partition's records only without a hole between them: a record whose offset
    is past the next one expected is put back (the consumer seeks to the missing offset) and
    read again, until the missing records come or the hole has lasted ``give_up_s``.

    Kafka's topics here have no holes (nothing is compacted and no producer is transactional),
    so on Kafka this never acts. The embedded broker (tansu 0.6) sometimes answers a fetch with
    a record before an earlier one that another producer's acknowledged write holds, the earlier
    becoming readable a moment later (measured: about 1 in 100,000 records with three producers
    on one topic; see docs/BROKER.md); a consumer that took the later one would never read the
    earlier one, a message lost to it. The expected offsets are this process's own: after a
    rebalance a partition may start past them (another member went on), which reads again what
    that member handled, and the inbox ignores it.
    """

    def __init__(self, *, give_up_s: float = 5.0) -> None:
        self.give_up_s = give_up_s
        self._next: dict[Any, int] = {}
        self._holes: dict[Any, tuple[int, float]] = {}  # partition → (missing offset, since)

    def take(self, consumer: Any, batches: dict[Any, list[Any]]) -> list[Any]:
        """The records of ``batches`` to hand on, in order; seeks back where it held any."""
        return [
            record for records in self.in_order(consumer, batches).values() for record in records
        ]

    def in_order(self, consumer: Any, batches: dict[Any, list[Any]]) -> dict[Any, list[Any]]:
        """``batches`` (what ``getmany`` returned) without the records past a hole, by
        partition; seeks back where it held any."""
        out: dict[Any, list[Any]] = {}
        for tp, records in batches.items():
            expected = self._next.get(tp)
            kept = 0
            for record in records:
                if (
                    expected is not None
                    and record.offset > expected
                    and not self._given_up(tp, expected, record.offset)
                ):
                    consumer.seek(tp, expected)
                    break
                expected = record.offset + 1
                kept += 1
            if kept:
                out[tp] = records[:kept]
                self._next[tp] = expected
                hole = self._holes.get(tp)
                if hole is not None and hole[0] < expected:
                    del self._holes[tp]
        return out

    def _given_up(self, tp: Any, missing: int, got: int) -> bool:
        now = time.monotonic()
        offset, since = self._holes.setdefault(tp, (missing, now))
        if offset != missing:
            self._holes[tp] = (missing, now)
            since = now
        if now - since < self.give_up_s:
            if since == now:
                metrics.FETCH_HOLES.labels("read_again").inc()
                log.info(
                    "fetch skipped offsets; reading again from the first missing one",
                    topic=tp.topic,
                    partition=tp.partition,
                    missing=missing,
                    got=got,
                )
            return False
        del self._holes[tp]
        metrics.FETCH_HOLES.labels("passed").inc()
        log.warning(
            "offsets never became readable; going on past them",
            topic=tp.topic,
            partition=tp.partition,
            missing_from=missing,
            missing_to=got - 1,
            waited_s=round(now - since, 3),
        )
        return True
