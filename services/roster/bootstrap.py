"""The composition root of the roster service; nothing connects at import time."""

from __future__ import annotations

from pathlib import Path

from contracts.topics import ORGS_EVENTS, ROSTER_ANSWERS, ROSTER_EVENTS_RESTRICTED
from services.roster.adapters.orm import messaging, metadata
from services.roster.domain.personal_data import (
    PersonalDataCipher,
    load_master_key,
    load_retired_keys,
)
from services.roster.entrypoints.queries import register_queries
from services.roster.service_layer.handlers import COMMANDS
from services.roster.service_layer.keys import (
    check_personal_data_keys,
    reencrypt_personal_data,
)
from services.roster.service_layer.projection import ORG_EVENTS
from services.roster.service_layer.saga import (
    RESULT_ROUTES,
    prepare_answers,
    sweep_overdue_sagas,
)
from services.roster.service_layer.unit_of_work import RosterUnitOfWork
from services.roster.settings import RosterSettings
from services.runtime.app import (
    EventSubscription,
    ServiceDefinition,
    ServiceRuntime,
    build_runtime,
)
from services.runtime.db import is_sqlite
from services.runtime.settings import Settings

SERVICE = "roster"
KEY_FILE = "roster-personal-data.key"


def definition(uow_class: type[RosterUnitOfWork] = RosterUnitOfWork) -> ServiceDefinition:
    return ServiceDefinition(
        name=SERVICE,
        metadata=metadata,
        tables=messaging,
        uow_class=uow_class,
        command_routes=COMMANDS,
        migrations_dir=Path(__file__).parent / "migrations",
        register_queries=register_queries,
        event_subscriptions=(
            EventSubscription(ORGS_EVENTS, ORG_EVENTS),
            # Quota's answers to the roster's slot requests: read with its commands.
            EventSubscription(
                ROSTER_ANSWERS, RESULT_ROUTES, saga_answers=True, prepare=prepare_answers
            ),
        ),
        background=(sweep_overdue_sagas, reencrypt_personal_data),
        startup=(check_personal_data_keys,),
        # A roster command carries a citizen ID in full, and so does a restricted event: dead
        # letters of commands and outbox rows of restricted events are sealed with its key.
        sealer=uow_class.cipher,
        sealed_topics=frozenset({ROSTER_EVENTS_RESTRICTED}),
    )


def configured_uow(settings: Settings, roster: RosterSettings) -> type[RosterUnitOfWork]:
    """The unit of work of a running roster: its personal-data cipher and saga timings.

    Without a configured key, only the embedded profile (a SQLite database) generates one, in
    the data directory; a production database refuses to start without its key.
    """
    url = settings.database_url(SERVICE)
    master = load_master_key(
        value=roster.personal_data_key.get_secret_value() if roster.personal_data_key else None,
        path=roster.personal_data_key_file,
        generate_at=(settings.data_dir / KEY_FILE).resolve() if is_sqlite(url) else None,
    )
    cipher = PersonalDataCipher(
        master,
        roster.personal_data_key_id,
        retired=load_retired_keys(roster.personal_data_retired_keys_dir),
    )
    return RosterUnitOfWork.configured(
        cipher=cipher,
        saga_timeout_s=roster.saga_timeout_s,
        saga_sweep_interval_s=roster.saga_sweep_interval_s,
    )


def sealer(settings: Settings) -> PersonalDataCipher | None:
    """What opens the roster's sealed outbox rows outside the service (``bianzhi replay``)."""
    return configured_uow(settings, RosterSettings()).cipher


def build(settings: Settings | None = None, roster: RosterSettings | None = None) -> ServiceRuntime:
    settings = settings or Settings()
    return build_runtime(definition(configured_uow(settings, roster or RosterSettings())), settings)
