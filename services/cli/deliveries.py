"""`bianzhi deliveries`: the notify deliveries an operator looks at, and resending one.

Listing asks notify's query API (``GET /deliveries``), the running service's own view, so it
works wherever the notify HTTP port is reachable and needs no database credentials. Resending
is a write, so it goes the way every write goes: a ``notify.ResendDelivery`` command on the
command topic, checked (admin role, the subscription inside the actor's region), audited and
answered on the results topic like any other command.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import httpx

from contracts.envelope import new_id
from contracts.notify import ResendDelivery
from services.cli.common import (
    CLI_SOURCE,
    CliError,
    add_broker_options,
    broker_settings,
    load_settings,
    positive_float,
    positive_int,
    print_json,
    read_platform,
    short_type,
)
from services.cli.send import build_envelope, send

STATUSES = ("failed", "pending", "delivered", "all")
_ERROR_WIDTH = 60


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "deliveries",
        help="list failed notify deliveries, or resend one",
        description=(
            "List notify's deliveries (by default the failed ones, most recently changed "
            "first) from its query API, or with --resend DELIVERY_ID send a "
            "notify.ResendDelivery command that makes notify deliver it again from its first "
            "attempt (needs --actor, --region and the admin role)."
        ),
    )
    parser.add_argument(
        "--status",
        choices=STATUSES,
        default="failed",
        help="which deliveries to list (default failed)",
    )
    parser.add_argument("--subscription", metavar="ID", help="only those of one subscription")
    parser.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help="at most N (default 50)"
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        help="notify's HTTP address (default: the notify of the platform running from --data-dir)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per delivery, with its attempts"
    )
    parser.add_argument(
        "--resend", metavar="DELIVERY_ID", help="deliver this delivery again instead of listing"
    )
    parser.add_argument("--actor", metavar="ID", help="the acting user (for --resend)")
    parser.add_argument("--region", metavar="CODE", help="the actor's office region (--resend)")
    parser.add_argument(
        "--roles", default="admin", metavar="ROLES", help="the actor's roles (default admin)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds to wait for an answer (default 30)",
    )
    add_broker_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.resend:
        return resend(args)
    return list_deliveries(args)


def notify_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    settings = load_settings(data_dir=args.data_dir)
    platform = read_platform(settings.data_dir)
    if platform is None or "notify" not in platform.services:
        raise CliError(
            f"no running notify found in {settings.data_dir}; start the platform with "
            "`bianzhi up` or pass --url http://HOST:PORT"
        )
    return platform.services["notify"].rstrip("/")


def fetch(args: argparse.Namespace) -> dict[str, Any]:
    """The page of deliveries the options ask for."""
    base = notify_url(args)
    params: dict[str, Any] = {"limit": args.limit}
    if args.status != "all":
        params["status"] = args.status
    if args.subscription:
        params["subscription_id"] = _uuid(args.subscription, "--subscription")
    try:
        response = httpx.get(f"{base}/deliveries", params=params, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach notify at {base} ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        raise CliError(f"notify at {base} answered {response.status_code}: {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body


def list_deliveries(args: argparse.Namespace) -> int:
    page = fetch(args)
    items: list[dict[str, Any]] = page.get("items", [])
    if args.json:
        for item in items:
            print_json(item)
        return 0
    if not items:
        print(f"no {'' if args.status == 'all' else args.status + ' '}deliveries")
        return 0
    for item in items:
        error = " ".join(str(item.get("last_error") or "").split())
        if len(error) > _ERROR_WIDTH:
            error = error[: _ERROR_WIDTH - 1] + "…"
        code = item.get("last_status_code")
        print(
            "  ".join(
                [
                    str(item["delivery_id"]),
                    str(item.get("updated_at", ""))[:19],
                    str(item["status"]),
                    f"{item.get('channel', '')}",
                    short_type(str(item["event_type"])),
                    f"attempts={item['attempts']}",
                    f"code={code if code is not None else '-'}",
                    str(item.get("subscriber", "")),
                    error,
                ]
            )
        )
    shown, total = len(items), int(page.get("total", len(items)))
    if total > shown:
        print(f"… {shown} of {total} shown (--limit)")
    return 0


def resend(args: argparse.Namespace) -> int:
    delivery_id = _uuid(args.resend, "--resend")
    envelope = build_envelope(
        ResendDelivery,
        {"delivery_id": delivery_id},
        command_id=new_id(),
        source=CLI_SOURCE,
        actor=args.actor,
        region=args.region,
        roles=args.roles,
    )
    settings = broker_settings(args)
    return asyncio.run(send(envelope, ResendDelivery.TOPIC, settings, timeout_s=args.timeout))


def _uuid(text: str, option: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise CliError(f"{option} {text!r}: expected a delivery or subscription UUID") from None
