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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from sqlalchemy import bindparam, delete, insert, select, update

from contracts.envelope import now
from services.roster.adapters.orm import people, personal_data_keys
from services.roster.domain.personal_data import (
    SEAL_LABEL,
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

_PERSON_VALUES = (people.c.person_id, people.c.citizen_enc, people.c.phone_enc)
_REWRITE_PERSON = (
    update(people)
    .where(people.c.person_id == bindparam("b_person_id"))
    .values(citizen_enc=bindparam("b_citizen_enc"), phone_enc=bindparam("b_phone_enc"))
)


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


def _rewrapped(cipher: PersonalDataCipher, row: Any, progress: Progress) -> dict[str, Any] | None:
    """The new values of a person's row under the current key, or ``None`` when nothing is to
    be done (or can be: a key not held is counted)."""
    values = {"citizen_enc": row.citizen_enc, "phone_enc": row.phone_enc}
    changed = False
    for column, blob in values.items():
        if blob is None or cipher.is_current(blob):
            continue
        key_id = key_id_of(blob) or "?"
        if key_id not in cipher.key_ids:
            progress.unopenable[key_id] += 1
            return None
        values[column] = cipher.reencrypt(blob, context=row.person_id)
        changed = True
    return values if changed else None


async def reencrypt_people_page(
    runtime: Any, cipher: PersonalDataCipher, after: str | None, progress: Progress
) -> str | None:
    """Re-encrypt under the current key the people after ``after`` (by id, ``PAGE`` of them)
    whose values are under another key; the last id of the page, ``None`` at the end.

    The page is read, and its new values computed, without the write lock; the rows are read
    again, locked, in the transaction that writes them, and a row a handler changed meanwhile
    is computed again there, so no change is lost and the lock is held for the statements
    only."""
    query = select(*_PERSON_VALUES)
    if after is not None:
        query = query.where(people.c.person_id > after)
    async with runtime.read_sessions() as session:
        rows = (await session.execute(query.order_by(people.c.person_id).limit(PAGE))).all()
    if not rows:
        return None
    progress.people_seen += len(rows)
    planned = {
        row.person_id: (row.citizen_enc, row.phone_enc, values)
        for row in rows
        if (values := _rewrapped(cipher, row, progress)) is not None
    }
    ids = list(planned)
    for start in range(0, len(ids), WRITE_CHUNK):
        async with runtime.uow() as uow:
            locked = (
                await uow.session.execute(
                    select(*_PERSON_VALUES)
                    .where(people.c.person_id.in_(ids[start : start + WRITE_CHUNK]))
                    .order_by(people.c.person_id)
                    .with_for_update()
                )
            ).all()
            changes = []
            for row in locked:
                citizen_enc, phone_enc, values = planned[row.person_id]
                if (row.citizen_enc, row.phone_enc) != (citizen_enc, phone_enc):
                    values = _rewrapped(cipher, row, Progress())  # changed since it was read
                if values is not None:
                    changes.append(
                        {
                            "b_person_id": row.person_id,
                            "b_citizen_enc": values["citizen_enc"],
                            "b_phone_enc": values["phone_enc"],
                        }
                    )
            if changes:
                await uow.session.execute(_REWRITE_PERSON, changes)
                await uow.commit()
                progress.people_reencrypted += len(changes)
    last: str = rows[-1].person_id
    return last


def _label_key(label: str | None) -> str | None:
    prefix = SEAL_LABEL + ":"
    if label is None or not label.startswith(prefix):
        return None
    return label[len(prefix) :]


async def reseal_outbox_page(
    runtime: Any,
    cipher: PersonalDataCipher,
    topics: Sequence[str],
    after: int,
    progress: Progress,
) -> int | None:
    """Seal again under the current key the outbox rows of ``topics`` after ``after`` (by
    seq, ``PAGE`` of them) sealed under another; the last seq of the page, ``None`` at the
    end. Published rows are kept for a while (``bianzhi replay``), so they are done too."""
    outbox = runtime.definition.tables.outbox
    async with runtime.read_sessions() as session:
        rows = (
            await session.execute(
                select(outbox.c.seq, outbox.c.headers)
                .where(outbox.c.seq > after, outbox.c.topic.in_(topics))
                .order_by(outbox.c.seq)
                .limit(PAGE)
            )
        ).all()
    if not rows:
        return None
    progress.outbox_seen += len(rows)
    due = [
        row.seq
        for row in rows
        if (key_id := _label_key((row.headers or {}).get(SEALED_HEADER))) is not None
        and key_id != cipher.key_id
    ]
    for start in range(0, len(due), WRITE_CHUNK):
        async with runtime.uow() as uow:
            locked = (
                await uow.session.execute(
                    select(outbox.c.seq, outbox.c.topic, outbox.c.value, outbox.c.headers)
                    .where(outbox.c.seq.in_(due[start : start + WRITE_CHUNK]))
                    .order_by(outbox.c.seq)
                    .with_for_update()
                )
            ).all()
            changes = []
            for row in locked:
                key_id = _label_key(row.headers.get(SEALED_HEADER))
                if key_id is None or key_id == cipher.key_id:
                    continue
                if key_id not in cipher.key_ids:
                    progress.unopenable[key_id] += 1
                    continue
                value, label = cipher.seal(cipher.unseal(row.value, row.topic), row.topic)
                changes.append(
                    {
                        "b_seq": row.seq,
                        "b_value": value,
                        "b_headers": {**row.headers, SEALED_HEADER: label},
                    }
                )
            if changes:
                await uow.session.execute(
                    update(outbox)
                    .where(outbox.c.seq == bindparam("b_seq"))
                    .values(value=bindparam("b_value"), headers=bindparam("b_headers")),
                    changes,
                )
                await uow.commit()
                progress.outbox_resealed += len(changes)
    last: int = rows[-1].seq
    return last


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

    person: str | None = None
    while (person := await reencrypt_people_page(runtime, cipher, person, progress)) is not None:
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            report("people")
            said = time.monotonic()
        await asyncio.sleep(0)
    topics = sorted(runtime.definition.sealed_topics)
    seq: int | None = 0
    while topics and seq is not None:
        seq = await reseal_outbox_page(runtime, cipher, topics, seq, progress)
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
