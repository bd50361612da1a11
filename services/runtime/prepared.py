"""Outcomes a batch ``prepare`` keeps for the handlers it serves (``BatchPreparer``).

A statement that serves the messages of one fetch at once keeps what it did for each of them,
by key, for the one-at-a-time repository calls it stands for; those hand it out in order
instead of running their own statement. Each call must ask for what the statement was made for
(``asked``); anything else is a bug. The unit of work refuses to commit while anything kept
was never asked for (``UnitOfWork.kept``), and forgets it all on rollback: the fetch is then
handled one message at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

V = TypeVar("V")


class Kept(Generic[V]):
    """Outcomes kept by key, each key made for one ``asked`` and handed out in order."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, tuple[Hashable, deque[V]]] = {}

    def keep(self, key: Hashable, asked: Hashable, outcomes: Iterable[V]) -> None:
        if key in self._by_key:
            raise RuntimeError(f"{key!r} was prepared twice")
        self._by_key[key] = (asked, deque(outcomes))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def take(self, key: Hashable, asked: Hashable) -> V:
        """The next outcome kept for ``key`` (one that ``key in self`` says is there)."""
        made_for, outcomes = self._by_key[key]
        if asked != made_for:
            raise RuntimeError(f"{key!r} was prepared for {made_for!r}, not {asked!r}")
        outcome = outcomes.popleft()
        if not outcomes:
            del self._by_key[key]
        return outcome

    def asked(self, key: Hashable) -> Hashable | None:
        """What the outcomes kept for ``key`` were made for; ``None`` when none are kept."""
        found = self._by_key.get(key)
        return None if found is None else found[0]

    def left(self) -> list[Hashable]:
        """The keys of outcomes nobody asked for (none once the handlers of a fetch ran)."""
        return list(self._by_key)

    def clear(self) -> None:
        self._by_key.clear()
