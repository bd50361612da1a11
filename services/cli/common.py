"""What the `bianzhi` commands share: errors, the running platform, names, times and Kafka clients.

Every expected failure is a `CliError`; `main` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import ValidationError

from contracts.base import Command, Message, registry
from contracts.envelope import Envelope
from contracts.topics import (
    COMMAND_RESULTS,
    DLQ_SUFFIX,
    SAGA_SERVICES,
    SERVICES,
    all_topics,
    answers,
    commands,
    events,
)

if TYPE_CHECKING:
    from services.runtime.app import ServiceDefinition
    from services.runtime.sealing import Sealer
    from services.runtime.settings import Settings

PLATFORM_FILE = "platform.json"
CLI_SOURCE = "/cli"

log = logging.getLogger("bianzhi.cli")


class CliError(Exception):
    """An expected failure: printed as ``bianzhi: error: <message>``, exit status 2."""


def say(message: str) -> None:
    """One progress line on stderr (stdout is kept for results)."""
    log.info(message)


def configure_cli_logging(level: str = "INFO") -> None:
    """Plain one-line messages on stderr; aiokafka's own connection noise only when debugging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bianzhi: %(message)s"))
    cli = logging.getLogger("bianzhi")
    cli.handlers = [handler]
    cli.propagate = False
    cli.setLevel(level.upper())
    # The CLI reports Kafka failures itself, in one line; aiokafka would add a traceback per retry.
    kafka_level = logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL
    logging.getLogger("aiokafka").setLevel(kafka_level)


# --- services -----------------------------------------------------------------------------


def existing_services() -> list[str]:
    """The services of the contract whose code is present (``services/<svc>/bootstrap.py``)."""
    found = []
    for svc in SERVICES:
        try:
            spec = importlib.util.find_spec(f"services.{svc}.bootstrap")
        except ImportError:
            spec = None
        if spec is not None:
            found.append(svc)
    return found


def service_definition(service: str) -> ServiceDefinition:
    """The service's definition from its composition root (connects nothing)."""
    module = importlib.import_module(f"services.{service}.bootstrap")
    definition: ServiceDefinition = module.definition()
    return definition


def service_sealer(service: str, settings: Settings) -> Sealer | None:
    """The key that opens ``service``'s sealed outbox rows, if it has one and it can be read;
    without it a sealed row cannot be published (``SealedRowError`` says so)."""
    module = importlib.import_module(f"services.{service}.bootstrap")
    make = getattr(module, "sealer", None)
    if make is None:
        return None
    try:
        found: Sealer | None = make(settings)
    except ValueError as exc:  # no key configured or a malformed one
        log.warning("%s: its sealed outbox rows cannot be opened: %s", service, exc)
        return None
    return found


def resolve_service(name: str, *, option: str = "SERVICE") -> str:
    """A service name that exists here, else a `CliError` naming what would do."""
    present = existing_services()
    if name in present:
        return name
    if name in SERVICES:
        raise CliError(
            f"{option} {name!r}: that service is not part of this installation"
            f" (present: {', '.join(present) or 'none'})"
        )
    raise CliError(
        f"{option} {name!r}: expected one of {', '.join(present) or 'none'}"
        f"{_did_you_mean(name, SERVICES)}"
    )


# --- settings and the running platform ----------------------------------------------------


def load_settings(**overrides: Any) -> Settings:
    """Settings from ``BIANZHI_*`` with the given overrides (``None`` values are left out)."""
    from services.runtime.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise CliError(
            f"setting {field} (BIANZHI_{field.upper()} or option): {first['msg']}"
        ) from None


@dataclass(frozen=True)
class Platform:
    """What `bianzhi up` wrote to ``DATA/platform.json`` for the other commands."""

    broker: str
    services: dict[str, str]
    pid: int
    started_at: str
    # `bianzhi up --require-signatures`: the generated dev key the CLI signs its commands with.
    signing_key: str | None = None
    signing_kid: str | None = None

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "broker": self.broker,
            "services": self.services,
            "pid": self.pid,
            "started_at": self.started_at,
        }
        if self.signing_key is not None:
            found["signing"] = {"private_key": self.signing_key, "kid": self.signing_kid}
        return found


def platform_path(data_dir: Path) -> Path:
    return data_dir / PLATFORM_FILE


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_platform(data_dir: Path) -> Platform | None:
    """The platform running from ``data_dir``; ``None`` without a file or when its pid is gone."""
    path = platform_path(data_dir)
    try:
        raw = json.loads(path.read_text())
        signing = raw.get("signing") or {}
        found = Platform(
            broker=str(raw["broker"]),
            services={str(k): str(v) for k, v in dict(raw.get("services", {})).items()},
            pid=int(raw["pid"]),
            started_at=str(raw.get("started_at", "")),
            signing_key=str(signing["private_key"]) if signing.get("private_key") else None,
            signing_kid=str(signing["kid"]) if signing.get("kid") else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if pid_alive(found.pid) else None


def write_platform(data_dir: Path, platform: Platform) -> None:
    """Write ``platform.json`` atomically."""
    write_json(platform_path(data_dir), platform.to_json())


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` as JSON, atomically (readers never see half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def find_broker(broker: str | None, data_dir: Path) -> str:
    """``--broker`` if given, else the broker of the platform running from ``data_dir``."""
    if broker:
        return broker
    platform = read_platform(data_dir)
    if platform is None:
        raise CliError(
            f"no running platform found in {data_dir}; start it with `bianzhi up` or pass --broker"
        )
    return platform.broker


# --- names --------------------------------------------------------------------------------

_VERSION = re.compile(r"\.v(\d+)$")


def short_type(type_: str) -> str:
    """``bianzhi.orgs.RegisterOrg.v1`` → ``orgs.RegisterOrg``."""
    return _VERSION.sub("", type_.removeprefix("bianzhi."))


def resolve_command_type(name: str) -> type[Message]:
    """The command model of a full (``bianzhi.orgs.RegisterOrg.v1``) or short type name.

    A short name (``orgs.RegisterOrg``, or ``RegisterOrg`` when only one service has it) means
    the highest version there is. Case does not matter when the name is otherwise unambiguous.
    """
    known = registry()
    wanted = name.strip()
    model = known.get(wanted) or known.get(f"bianzhi.{wanted}")
    if model is None:
        model = _by_short_name(wanted, known)
    if model is None:
        choices = sorted({short_type(t) for t, m in known.items() if issubclass(m, Command)})
        raise CliError(f"TYPE {name!r}: not a known command type{_did_you_mean(name, choices)}")
    if not issubclass(model, Command):
        raise CliError(
            f"TYPE {name!r}: {model.TYPE} is not a command; `bianzhi send` sends commands"
        )
    return model


def _by_short_name(wanted: str, known: dict[str, type[Message]]) -> type[Message] | None:
    def version(type_: str) -> int:
        match = _VERSION.search(type_)
        return int(match.group(1)) if match else 0

    if _VERSION.search(wanted):
        # An explicit version must exist as such; only case is forgiven.
        full = f"bianzhi.{wanted.removeprefix('bianzhi.')}".lower()
        return next((m for t, m in known.items() if t.lower() == full), None)
    stem = short_type(wanted).lower()
    for exact in (True, False):
        hits = [
            t
            for t in known
            if (short_type(t).lower() == stem)
            or (not exact and short_type(t).lower().rsplit(".", 1)[-1] == stem)
        ]
        if len({short_type(t) for t in hits}) == 1:
            return known[max(hits, key=version)]
    return None


def _short_topics() -> dict[str, str]:
    names = {"results": COMMAND_RESULTS, "command-results": COMMAND_RESULTS}
    for svc in SERVICES:
        names[f"{svc}.commands"] = commands(svc)
        names[f"{svc}.events"] = events(svc)
    for svc in SAGA_SERVICES:
        names[f"{svc}.answers"] = answers(svc)
    return names | {f"{k}{DLQ_SUFFIX}": f"{v}{DLQ_SUFFIX}" for k, v in names.items()}


def resolve_topic(name: str) -> str:
    """A topic name: full names pass through; ``orgs.events`` and ``results`` are short forms."""
    wanted = name.strip()
    if wanted in all_topics() or wanted.startswith("bianzhi."):
        return wanted
    short = _short_topics()
    if wanted in short:
        return short[wanted]
    raise CliError(
        f"TOPIC {name!r}: expected a topic name or a short form such as orgs.events, "
        f"quota.commands or results{_did_you_mean(name, list(short))}"
    )


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    pool = list(choices)
    lowered = {c.lower(): c for c in pool}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    if not close:
        # Short fragments ("Register") match as substrings rather than by similarity.
        close = [c for c in lowered if name.lower() in c][:3]
    return f"; did you mean {', '.join(lowered[c] for c in close)}?" if close else ""


# --- times --------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``7d`` (ago), or an ISO date/datetime (naive means local time); UTC.

    The outbox stores UTC; SQLite drops the offset, so the result is always converted to UTC.
    """
    value = text.strip()
    current = now or datetime.now(UTC)
    if match := _DURATION.match(value.lower()):
        amount, unit = float(match.group(1)), match.group(2)
        return (current - timedelta(seconds=amount * _UNIT_SECONDS[unit])).astimezone(UTC)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            day = date.fromisoformat(value)
            parsed = datetime(day.year, day.month, day.day)
        else:
            parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(
            f"--since {text!r}: expected an ISO date or datetime (2026-01-31, "
            "2026-01-31T09:00+08:00) or an age such as 30m, 2h, 7d"
        ) from None
    return parsed.astimezone(UTC)  # a naive value is taken as local time


# --- Kafka clients ------------------------------------------------------------------------


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Connection options of a plain aiokafka client, security included, from settings."""
    # Imported here: the services' broker module brings FastStream and SQLAlchemy, which the
    # commands that only read the query APIs need not load.
    from services.runtime.broker import client_options

    try:
        return client_options(settings, client_id=f"{settings.kafka_client_id}-cli")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """acks=all; idempotence as the settings say (off for the embedded broker)."""
    return AIOKafkaProducer(
        **kafka_options(settings),
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        request_timeout_ms=15_000,
    )


def make_consumer(settings: Settings, **extra: Any) -> AIOKafkaConsumer:
    """A consumer without a group (partitions are assigned by hand, nothing is committed)."""
    options: dict[str, Any] = {
        "group_id": None,
        "enable_auto_commit": False,
        "fetch_max_wait_ms": 50,
        "request_timeout_ms": 15_000,
    }
    return AIOKafkaConsumer(**kafka_options(settings), **(options | extra))


@contextlib.asynccontextmanager
async def kafka_errors(bootstrap: str) -> AsyncIterator[None]:
    """Turn a Kafka failure into a one-line `CliError`."""
    try:
        yield
    except BrokenPipeError:
        raise  # our reader went away (`| head`), not the broker
    except (KafkaConnectionError, OSError, TimeoutError) as exc:
        raise CliError(
            f"cannot reach the Kafka broker at {bootstrap} ({_reason(exc)}); is the platform"
            " running (`bianzhi up`)?"
        ) from None
    except KafkaError as exc:
        raise CliError(f"the Kafka broker at {bootstrap} answered {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def topic_partitions(settings: Settings, topics: Iterable[str]) -> dict[str, list[int]]:
    """The partitions of each topic; a `CliError` names those the broker does not have.

    Asks for the list of all topics first: naming a missing topic in a metadata request makes
    some brokers (tansu among them) create it with their default partition count.
    """
    wanted = list(dict.fromkeys(topics))
    admin = AIOKafkaAdminClient(**kafka_options(settings), request_timeout_ms=15_000)
    async with kafka_errors(settings.kafka_bootstrap):
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing:
                raise CliError(
                    f"the broker at {settings.kafka_bootstrap} has no topic {', '.join(missing)};"
                    " `bianzhi up` creates the topics of the contract"
                )
            described = await admin.describe_topics(wanted)
        finally:
            await admin.close()
    return {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described}


def decode_text(raw: bytes | None) -> str | None:
    """UTF-8 text, or the bytes' repr when they are not text."""
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return repr(raw)


def print_json(value: Any, *, pretty: bool = False) -> None:
    """One JSON document on stdout (Chinese kept readable), flushed at once."""
    text = json.dumps(value, ensure_ascii=False, indent=2 if pretty else None, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- options shared by several commands ---------------------------------------------------


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the platform's data directory (default: $BIANZHI_DATA_DIR or ./data)",
    )


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    add_data_dir_option(parser)
    parser.add_argument(
        "--broker",
        metavar="BOOTSTRAP",
        help="Kafka bootstrap servers (default: the platform running from --data-dir)",
    )


def broker_settings(args: argparse.Namespace) -> Settings:
    """Settings pointing at ``--broker`` or at the platform running from ``--data-dir``."""
    base = load_settings(data_dir=args.data_dir)
    bootstrap = find_broker(args.broker, base.data_dir)
    return load_settings(data_dir=base.data_dir, kafka_bootstrap=bootstrap)


def command_signer(settings: Settings) -> Callable[[Envelope], Envelope] | None:
    """What the CLI signs its commands with (docs/security.md): the key named by
    ``BIANZHI_SIGNING_PRIVATE_KEY``/``BIANZHI_SIGNING_KID``, else the dev key of a platform
    started with ``bianzhi up --require-signatures`` from the data directory, else nothing."""
    from services.runtime.security_settings import SecuritySettings
    from services.runtime.signing import KeyFileError, envelope_signer

    try:
        security = SecuritySettings()
        signer = envelope_signer(security)
        if signer is not None:
            return signer
        platform = read_platform(settings.data_dir)
        if platform is None or platform.signing_key is None or platform.signing_kid is None:
            return None
        return envelope_signer(
            SecuritySettings(
                signing_private_key=Path(platform.signing_key),
                signing_kid=platform.signing_kid,
                signing_ttl_s=security.signing_ttl_s,
            )
        )
    except ValidationError as exc:
        raise CliError(f"signing settings: {exc.errors()[0]['msg']}") from None
    except KeyFileError as exc:
        raise CliError(f"signing key: {exc}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, got {text}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 1 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"expected a TCP port between 1 and 65535, got {value}")
    return value
