"""The personal-data keys at work: checked when the roster starts, and rotated.

**At start** (``check_personal_data_keys``, before any message is read) the roster makes sure
its keys fit the stored data, and refuses to start when they do not:

- the blind index is computed with the key the database records for it
  (``personal_data_keys``), which must be held, as the current key or a retired one. The
  first start with that table records the key the stored numbers were encrypted with (the
  only key there was), or the current key on an empty roster;
- a person's stored number (the first and the last by id) opens with the key it names and
  hashes to its stored blind index. A wrong key given under the right id would otherwise let
  the same number in twice: its hash would find nobody.

**Rotation** (docs/deploy.md, "Rotating credentials"): a new current key encrypts everything
written from then on; the old key, given as a retired key, still opens what it encrypted.
While retired keys are held, ``reencrypt_personal_data`` walks the people (citizen ID and
phone number) and the sealed outbox rows at start, in pages, and re-encrypts under the current
key whatever is under another, ``WRITE_CHUNK`` rows per transaction with the rows locked, so a
handler's write and the walk's never interleave. The log shows the progress and says when
nothing under a retired key is left; that is recorded, and later starts under the same current
key do not walk again. The blind index does not change, so lookups and the unique constraint
work throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from sqlalchemy import Select, Table, Update, bindparam, delete, insert, select, update

from contracts.envelope import now
from services.roster.adapters.orm import people, personal_data_keys
from services.roster.domain.personal_data import (
    PersonalDataCipher,
    PersonalDataKeyError,
    key_id_of,
)
from services.runtime.db import ignoring_duplicates
from services.runtime.sealing import SEALED_HEADER

log = structlog.get_logger("bianzhi.roster.keys")

# The purposes recorded in ``personal_data_keys``: the key the stored blind indexes were
# computed with, and the key everything was encrypted under when a walk last finished clean.
BLIND_INDEX = "blind_index"
ENCRYPTION = "encryption"
PAGE = 1000
# Rows written per transaction: on SQLite every handler waits for the write lock meanwhile
# (measured: about 75 ms for 1,000 people on a slow machine, so a fifth of that for 200).
WRITE_CHUNK = 200
# How often the walk says how far it got, at most.
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class _Sealed:
    """A table whose ``columns`` hold values under a personal-data key, walked by ``key``; a
    re-encryption writes ``written``, and reads ``extra`` besides (what a value is bound to)."""

    table: Table
    key: str
    columns: tuple[str, ...]
    written: tuple[str, ...]
    extra: tuple[str, ...] = ()

    @cached_property
    def select(self) -> Select[Any]:
        t = self.table
        return select(*(t.c[name] for name in (self.key, *self.columns, *self.extra)))

    @cached_property
    def rewrite(self) -> Update:
        t = self.table
        return (
            update(t)
            .where(t.c[self.key] == bindparam("b_key"))
            .values({name: bindparam(f"b_{name}") for name in self.written})
        )


_PEOPLE = _Sealed(
    people, "person_id", ("citizen_enc", "phone_enc"), written=("citizen_enc", "phone_enc")
)
# A row's new ``written`` values under the current key; ``None`` when there is nothing to do.
Rewrap = Callable[[Any], dict[str, Any] | None]


def _cipher(runtime: Any) -> PersonalDataCipher:
    cipher: PersonalDataCipher | None = runtime.definition.uow_class.cipher
    if cipher is None:
        raise PersonalDataKeyError("the roster's personal-data cipher is not configured")
    return cipher


async def check_personal_data_keys(runtime: Any) -> None:
    """Fit the cipher to the stored data (the blind index key), or refuse to start."""
    cipher = _cipher(runtime)
    async with runtime.uow() as uow:
        session = uow.session
        recorded = await session.scalar(
            select(personal_data_keys.c.key_id).where(personal_data_keys.c.purpose == BLIND_INDEX)
        )
        first = (
            await session.execute(select(people).order_by(people.c.person_id).limit(1))
        ).first()
        last = (
            await session.execute(select(people).order_by(people.c.person_id.desc()).limit(1))
        ).first()
        index_key = recorded
        if index_key is None:
            # No rotation was possible before this record: the stored indexes were computed
            # with the key the stored numbers are encrypted with.
            index_key = key_id_of(first.citizen_enc) if first is not None else cipher.key_id
            if index_key is None:
                raise PersonalDataKeyError(
                    f"person {first.person_id}: the stored citizen ID is not in the "
                    "personal-data format"
                )
        cipher.use_index_key(index_key)
        for person in {row.person_id: row for row in (first, last) if row is not None}.values():
            _check_person(cipher, person)
        if recorded is None:
            # Replicas starting together record the same key: the first one's row stays.
            await session.execute(
                ignoring_duplicates(session, personal_data_keys),
                [{"purpose": BLIND_INDEX, "key_id": index_key, "recorded_at": now()}],
            )
            await uow.commit()
    log.info(
        "personal-data keys checked",
        current_key=cipher.key_id,
        retired_keys=sorted(cipher.retired_key_ids),
        blind_index_key=index_key,
        recorded_now=recorded is None,
    )


def _check_person(cipher: PersonalDataCipher, person: Any) -> None:
    key_id = key_id_of(person.citizen_enc)
    try:
        number = cipher.decrypt(person.citizen_enc, context=person.person_id)
    except InvalidTag:
        raise PersonalDataKeyError(
            f"person {person.person_id}: the stored citizen ID does not open with the key "
            f"configured as {key_id}; it is another key than the one that encrypted it"
        ) from None
    if cipher.blind_index(number) != person.citizen_index:
        raise PersonalDataKeyError(
            f"person {person.person_id}: the stored blind index was not computed with the key "
            f"configured as {cipher.index_key_id}; it is another key than the one that did"
        )


@dataclass
class Progress:
    """What a walk found and did."""

    people_seen: int = 0
    people_reencrypted: int = 0
    outbox_seen: int = 0
    outbox_resealed: int = 0
    # Values under a key that is not held (by key id): they cannot be opened.
    unopenable: Counter[str] = field(default_factory=Counter)


def _under_old_keys(
    cipher: PersonalDataCipher, blobs: Sequence[bytes | None], progress: Progress
) -> bool | None:
    """Whether any of ``blobs`` is under another key than the current one; ``None`` when one is
    under a key not held (counted: it cannot be re-encrypted)."""
    stale = [blob for blob in blobs if blob is not None and not cipher.is_current(blob)]
    for blob in stale:
        key_id = key_id_of(blob) or "?"
        if key_id not in cipher.key_ids:
            progress.unopenable[key_id] += 1
            return None
    return bool(stale)


def _person_rewrap(cipher: PersonalDataCipher, progress: Progress) -> Rewrap:
    def rewrap(row: Any) -> dict[str, Any] | None:
        if not _under_old_keys(cipher, (row.citizen_enc, row.phone_enc), progress):
            return None
        return {
            "citizen_enc": cipher.reencrypt(row.citizen_enc, context=row.person_id),
            "phone_enc": (
                cipher.reencrypt(row.phone_enc, context=row.person_id) if row.phone_enc else None
            ),
        }

    return rewrap


def _outbox_rewrap(cipher: PersonalDataCipher, progress: Progress) -> Rewrap:
    def rewrap(row: Any) -> dict[str, Any] | None:
        if not _under_old_keys(cipher, (row.value,), progress):
            return None
        return {
            "value": cipher.reseal(row.value, row.topic),
            "headers": {**row.headers, SEALED_HEADER: cipher.seal_label},
        }

    return rewrap


async def _rewrite_page(
    runtime: Any, sealed: _Sealed, after: Any, rewrap: Rewrap, where: Any = None
) -> tuple[int, int, Any]:
    """Re-encrypt under the current key the rows of ``sealed`` after ``after`` (by its key,
    ``PAGE`` of them) that ``rewrap`` finds under another: rows seen, rows rewritten, and the
    last key of the page (``None`` at the end).

    The page is read, and its new values computed, without the write lock; the rows are read
    again, locked, in the transactions that write them (``WRITE_CHUNK`` rows each), and a row
    changed meanwhile is computed again there, so no change is lost and the lock is held for
    the statements only."""
    key = sealed.table.c[sealed.key]
    query = sealed.select
    if after is not None:
        query = query.where(key > after)
    if where is not None:
        query = query.where(where)
    async with runtime.read_sessions() as session:
        rows = (await session.execute(query.order_by(key).limit(PAGE))).all()
    if not rows:
        return 0, 0, None
    planned = {
        getattr(row, sealed.key): (row, values)
        for row in rows
        if (values := rewrap(row)) is not None
    }
    ids = list(planned)
    rewritten = 0
    for start in range(0, len(ids), WRITE_CHUNK):
        async with runtime.uow() as uow:
            locked = (
                await uow.session.execute(
                    sealed.select.where(key.in_(ids[start : start + WRITE_CHUNK]))
                    .order_by(key)
                    .with_for_update()
                )
            ).all()
            changes = []
            for row in locked:
                read, values = planned[getattr(row, sealed.key)]
                if tuple(row) != tuple(read):
                    values = rewrap(row)  # changed since it was read
                if values is not None:
                    changes.append(
                        {"b_key": getattr(row, sealed.key)}
                        | {f"b_{name}": value for name, value in values.items()}
                    )
            if changes:
                await uow.session.execute(sealed.rewrite, changes)
                await uow.commit()
                rewritten += len(changes)
    return len(rows), rewritten, getattr(rows[-1], sealed.key)


async def reencrypt_all(runtime: Any) -> Progress:
    """One walk over the people and the sealed outbox rows (see the module's docstring)."""
    cipher = _cipher(runtime)
    progress = Progress()
    started = said = time.monotonic()

    def report(phase: str) -> None:
        log.info(
            "re-encrypting personal data under the current key",
            phase=phase,
            current_key=cipher.key_id,
            people_seen=progress.people_seen,
            people_reencrypted=progress.people_reencrypted,
            outbox_rows_resealed=progress.outbox_resealed,
            elapsed_s=round(time.monotonic() - started, 1),
        )

    people_rewrap = _person_rewrap(cipher, progress)
    person: Any = None
    while True:
        seen, done, person = await _rewrite_page(runtime, _PEOPLE, person, people_rewrap)
        progress.people_seen += seen
        progress.people_reencrypted += done
        if person is None:
            break
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            report("people")
            said = time.monotonic()
        await asyncio.sleep(0)
    topics = sorted(runtime.definition.sealed_topics)
    outbox = runtime.definition.tables.outbox
    sealed_rows = _Sealed(
        outbox, "seq", ("value",), written=("value", "headers"), extra=("topic", "headers")
    )
    outbox_rewrap = _outbox_rewrap(cipher, progress)
    seq: Any = 0
    while topics:
        seen, done, seq = await _rewrite_page(
            runtime, sealed_rows, seq, outbox_rewrap, where=outbox.c.topic.in_(topics)
        )
        progress.outbox_seen += seen
        progress.outbox_resealed += done
        if seq is None:
            break
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            report("outbox")
            said = time.monotonic()
        await asyncio.sleep(0)
    return progress


async def _encrypted_under(runtime: Any) -> str | None:
    """The key everything was under when a walk last left nothing under another, if any."""
    async with runtime.read_sessions() as session:
        found: str | None = await session.scalar(
            select(personal_data_keys.c.key_id).where(personal_data_keys.c.purpose == ENCRYPTION)
        )
    return found


async def _record_encrypted_under(runtime: Any, key_id: str) -> None:
    async with runtime.uow() as uow:
        await uow.session.execute(
            delete(personal_data_keys).where(personal_data_keys.c.purpose == ENCRYPTION)
        )
        await uow.session.execute(
            insert(personal_data_keys).values(purpose=ENCRYPTION, key_id=key_id, recorded_at=now())
        )
        await uow.commit()


async def reencrypt_personal_data(runtime: Any) -> None:
    """The background task: while retired keys are held, one walk per start, until a walk
    leaves nothing under another key than the current one. That is recorded (everything
    written since is under the current key too), and later starts with the same current key
    do not walk again."""
    cipher = _cipher(runtime)
    if not cipher.retired_key_ids:
        return
    try:
        if await _encrypted_under(runtime) == cipher.key_id:
            log.info(
                "personal data is all under the current key: nothing to re-encrypt",
                current_key=cipher.key_id,
            )
            return
        progress = await reencrypt_all(runtime)
        if not progress.unopenable:
            await _record_encrypted_under(runtime, cipher.key_id)
    except Exception as exc:  # the next start walks again; nothing is half-written
        log.error("re-encrypting personal data failed", error=repr(exc))
        return
    done = dict(
        current_key=cipher.key_id,
        retired_keys=sorted(cipher.retired_key_ids),
        people_seen=progress.people_seen,
        people_reencrypted=progress.people_reencrypted,
        outbox_rows_resealed=progress.outbox_resealed,
    )
    if progress.unopenable:
        log.error(
            "personal data under keys that are not configured: it cannot be read until they are",
            keys=dict(progress.unopenable),
            **done,
        )
    else:
        log.info(
            "personal data re-encrypted: nothing in the database is under a retired key now "
            "(keep them only to open older sealed dead letters)",
            **done,
        )
