"""The SQL statements a service's engine runs, recorded for tests that count or check them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine.interfaces import CacheStats
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass(frozen=True)
class Executed:
    sql: str  # on one line, upper-cased
    # False when SQLAlchemy could make no cache key for it, so compiles it at every execution
    # (a multi-row VALUES does that); statements run without SQLAlchemy's compiler count as
    # cached (``insert_rows`` compiles its own once).
    cached: bool

    def reads(self, table: str) -> bool:
        """Whether this is a ``SELECT`` from (or joining) ``table``."""
        name = re.escape(table.upper())
        return (
            self.sql.startswith("SELECT")
            and re.search(rf"\b(FROM|JOIN) {name}\b", self.sql) is not None
        )

    def writes(self, table: str) -> str | None:
        """``INSERT`` or ``UPDATE`` when this statement writes ``table``."""
        verb = self.sql.split(" ", 1)[0]
        if self.sql.startswith((f"INSERT INTO {table.upper()} ", f"UPDATE {table.upper()} ")):
            return verb
        return None


@contextlib.contextmanager
def recorded(engine: AsyncEngine) -> Iterator[list[Executed]]:
    """The statements ``engine`` runs inside the block, in order."""
    seen: list[Executed] = []

    def record(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        compiled = getattr(context, "compiled", None) if context is not None else None
        uncached = compiled is not None and context.cache_hit == CacheStats.NO_CACHE_KEY
        seen.append(Executed(" ".join(statement.split()).upper(), not uncached))

    with _listening(engine, "after_cursor_execute", record):
        yield seen


def uncached(seen: list[Executed]) -> list[str]:
    """The statements of ``seen`` that SQLAlchemy compiled anew, for want of a cache key."""
    return [e.sql for e in seen if not e.cached]


@contextlib.contextmanager
def commits(engine: AsyncEngine) -> Iterator[list[None]]:
    """One entry per transaction ``engine`` commits inside the block."""
    seen: list[None] = []

    def record(_conn: Any) -> None:
        seen.append(None)

    with _listening(engine, "commit", record):
        yield seen


@contextlib.contextmanager
def _listening(engine: AsyncEngine, name: str, listener: Callable[..., None]) -> Iterator[None]:
    """``listener`` on ``engine``'s event ``name`` inside the block."""
    sync = engine.sync_engine
    event.listen(sync, name, listener)
    try:
        yield
    finally:
        event.remove(sync, name, listener)
