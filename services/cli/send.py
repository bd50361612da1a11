"""`bianzhi send`: publish one command and wait for its result on the command-results topic."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from contracts.base import Message
from contracts.codes import Role
from contracts.envelope import CONTENT_TYPE, Envelope, new_id, now
from contracts.results import CommandCompleted, CommandRejected
from contracts.topics import COMMAND_RESULTS, SERVICES, commands
from services.cli.common import (
    CLI_SOURCE,
    CliError,
    add_broker_options,
    broker_settings,
    command_signer,
    kafka_errors,
    make_consumer,
    make_producer,
    positive_float,
    print_json,
    read_platform,
    resolve_command_type,
    short_type,
    topic_partitions,
)
from services.runtime.gaps import OffsetGapGuard
from services.runtime.settings import Settings

EXIT_COMPLETED = 0
EXIT_REJECTED = 1
EXIT_TIMEOUT = 3

_REGION = re.compile(r"^\d{6}$")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "send",
        help="send one command and wait for its result",
        description=(
            "Publish one command to its topic and wait for its result on "
            f"{COMMAND_RESULTS}. Exit status: 0 CommandCompleted, 1 CommandRejected, "
            "2 error, 3 no result in time."
        ),
    )
    parser.add_argument(
        "type",
        metavar="TYPE",
        help="the command type, full (bianzhi.orgs.RegisterOrg.v1) or short (orgs.RegisterOrg)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="JSON|@FILE",
        help="the command's data as a JSON object, or @file (@- reads stdin)",
    )
    parser.add_argument("--actor", metavar="ID", help="the acting user (actorid)")
    parser.add_argument(
        "--region", metavar="CODE", help="the actor's office region, a GB/T 2260 code"
    )
    parser.add_argument(
        "--roles", metavar="ROLES", help="the actor's roles, comma-separated: clerk,approver,admin"
    )
    parser.add_argument("--id", metavar="ID", help="the command id (default: a new UUID)")
    parser.add_argument(
        "--source", default=CLI_SOURCE, help=f"the CloudEvents source (default {CLI_SOURCE})"
    )
    add_broker_options(parser)
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds to wait for the result (default 30)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="print where the command was written and exit without waiting for its result",
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="send the data as given, without checking it or the actor locally "
        "(to test how the service rejects it)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = resolve_command_type(args.type)
    data = load_data(args.data)
    envelope = build_envelope(
        model,
        data,
        command_id=args.id or new_id(),
        source=args.source,
        actor=args.actor,
        region=args.region,
        roles=args.roles,
        validate=not args.no_validate,
    )
    settings = broker_settings(args)
    if not args.no_wait and not args.broker:
        _require_service_running(model, settings)
    if (signer := command_signer(settings)) is not None:
        envelope = signer(envelope)
    return asyncio.run(
        send(envelope, model.TOPIC, settings, timeout_s=args.timeout, wait=not args.no_wait)
    )


def _require_service_running(model: type[Message], settings: Settings) -> None:
    # A command for a service the platform does not run would wait for its result in vain.
    platform = read_platform(settings.data_dir)
    service = next((s for s in SERVICES if commands(s) == model.TOPIC), None)
    if platform is not None and service is not None and service not in platform.services:
        raise CliError(
            f"TYPE {short_type(model.TYPE)}: the {service} service is not running in this "
            f"platform (running: {', '.join(platform.services) or 'none'}); "
            "--no-wait sends it anyway"
        )


def load_data(text: str) -> dict[str, Any]:
    """``--data``: a JSON object given inline, in a file (``@path``) or on stdin (``@-``)."""
    if text.startswith("@"):
        name = text[1:]
        try:
            raw = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--data {text}: cannot read the file ({exc})") from None
    else:
        raw = text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"--data: expected a JSON object; {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise CliError(f"--data: expected a JSON object, got {type(value).__name__}")
    return value


def field_errors(exc: ValidationError) -> str:
    """Pydantic's errors as ``field.path: message; …`` on one line."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(data)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def build_envelope(
    model: type[Message],
    data: dict[str, Any],
    *,
    command_id: str,
    source: str,
    actor: str | None,
    region: str | None,
    roles: str | None,
    validate: bool = True,
) -> Envelope:
    """The command's envelope; unless ``validate`` is off, data and actor are checked first."""
    role_list = [r.strip() for r in (roles or "").split(",") if r.strip()]
    actor_roles = ",".join(role_list) or None
    if validate:
        _check_actor(actor, region, role_list)
        try:
            payload = model.model_validate(data)
        except ValidationError as exc:
            raise CliError(
                f"--data does not fit {short_type(model.TYPE)}: {field_errors(exc)}"
                " (--no-validate sends it anyway)"
            ) from None
        try:
            return payload.envelope(
                source=source,
                id=command_id,
                actorid=actor,
                actorregion=region,
                actorroles=actor_roles,
            )
        except ValidationError as exc:
            raise CliError(f"envelope: {field_errors(exc)}") from None
    subject = data.get(model.SUBJECT) if model.SUBJECT else None
    try:
        return Envelope(
            id=command_id,
            source=source,
            type=model.TYPE,
            time=now(),
            subject=None if subject is None else str(subject),
            correlationid=command_id,
            actorid=actor,
            actorregion=region,
            actorroles=actor_roles,
            data=data,
        )
    except ValidationError as exc:
        raise CliError(f"envelope: {field_errors(exc)}") from None


def _check_actor(actor: str | None, region: str | None, roles: list[str]) -> None:
    missing = [
        option
        for option, value in (("--actor", actor), ("--region", region), ("--roles", roles))
        if not value
    ]
    if missing:
        raise CliError(
            f"{', '.join(missing)}: a command must name its actor (--actor ID --region CODE "
            "--roles clerk|approver|admin); --no-validate sends it without"
        )
    if region is not None and not _REGION.match(region):
        raise CliError(f"--region {region!r}: expected a six-digit GB/T 2260 code such as 130100")
    known = {r.value for r in Role}
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise CliError(
            f"--roles {','.join(roles)!r}: unknown role {', '.join(unknown)};"
            f" expected some of {', '.join(r.value for r in Role)}"
        )


async def send(
    envelope: Envelope, topic: str, settings: Settings, *, timeout_s: float, wait: bool = True
) -> int:
    """Publish ``envelope`` to ``topic``; with ``wait``, print its result and return the status."""
    bootstrap = settings.kafka_bootstrap
    partitions = await topic_partitions(settings, [topic, COMMAND_RESULTS])
    results: AIOKafkaConsumer | None = None
    try:
        if wait:
            # Listen before sending, so that a fast result cannot slip past.
            results = make_consumer(settings, fetch_max_wait_ms=20)
            async with kafka_errors(bootstrap):
                await results.start()
                tps = [TopicPartition(COMMAND_RESULTS, p) for p in partitions[COMMAND_RESULTS]]
                results.assign(tps)
                await results.seek_to_end(*tps)
                for tp in tps:
                    await results.position(tp)  # pins the end offsets now
        producer = make_producer(settings)
        async with kafka_errors(bootstrap):
            await producer.start()
            try:
                written = await producer.send_and_wait(
                    topic,
                    envelope.to_bytes(),
                    key=envelope.subject.encode() if envelope.subject else None,
                    headers=[("content-type", CONTENT_TYPE.encode())],
                )
            finally:
                await producer.stop()
        if results is None:
            print_json(
                {
                    "id": envelope.id,
                    "type": envelope.type,
                    "topic": written.topic,
                    "partition": written.partition,
                    "offset": written.offset,
                },
                pretty=True,
            )
            return EXIT_COMPLETED
        async with kafka_errors(bootstrap):
            result = await wait_for_result(results, envelope.id, timeout_s)
    finally:
        if results is not None:
            await results.stop()
    if result is None:
        sys.stderr.write(
            f"bianzhi: no result for command {envelope.id} within {timeout_s:g} s; is the "
            f"service of {topic} running? (`bianzhi tail results` shows results as they come)\n"
        )
        return EXIT_TIMEOUT
    print_json(result, pretty=True)
    if result.get("type") == CommandCompleted.TYPE:
        return EXIT_COMPLETED
    if result.get("type") == CommandRejected.TYPE:
        return EXIT_REJECTED
    return EXIT_REJECTED  # an unknown result type is not a success


async def wait_for_result(
    consumer: AIOKafkaConsumer, command_id: str, timeout_s: float
) -> dict[str, Any] | None:
    """The first result whose ``data.command_id`` is ``command_id``, or ``None`` in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    guard = OffsetGapGuard()  # no result skipped (docs/BROKER.md)
    while (remaining := deadline - loop.time()) > 0:
        batches = guard.in_order(
            consumer,
            await consumer.getmany(timeout_ms=max(1, int(min(remaining, 0.5) * 1000))),
        )
        for records in batches.values():
            for record in records:
                try:
                    value = json.loads(record.value or b"")
                except ValueError:
                    continue
                data = value.get("data") if isinstance(value, dict) else None
                if isinstance(data, dict) and data.get("command_id") == command_id:
                    return value
    return None
