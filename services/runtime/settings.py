"""Settings of every service, read from ``BIANZHI_*`` environment variables (or mounted files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


class Settings(BaseSettings):
    """One process's configuration. Defaults are the embedded profile (``bianzhi up``)."""

    model_config = SettingsConfigDict(env_prefix="BIANZHI_", extra="ignore")

    data_dir: Path = Path("data")
    source: str = "/bianzhi"
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    migrate_on_start: bool = True

    # Kafka connection
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_client_id: str = "bianzhi"
    # Consumer groups are "<prefix>-<service>"; a second deployment on one cluster changes it.
    kafka_group_prefix: str = "bianzhi"
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_allow_auto_create_topics: bool = False

    # Kafka producer: idempotence must stay off for the embedded broker, on for real Kafka.
    kafka_enable_idempotence: bool = False
    # Relays publish a pass of rows at once, and rows queue while a request is in flight, so
    # records share batches without waiting; a linger would only delay every result.
    kafka_linger_ms: int = Field(default=0, ge=0, le=1000)
    kafka_max_batch_size: int = Field(default=256 * 1024, ge=16 * 1024)
    kafka_topic_partitions: int = Field(default=12, ge=1, le=1000)
    kafka_replication_factor: int = Field(default=1, ge=1, le=10)
    # `bianzhi up`'s embedded broker: the worker threads of its async runtime (see
    # services/runtime/embedded_broker.py on why one).
    embedded_broker_threads: int = Field(default=1, ge=1, le=64)

    # Kafka consumers: group joins take about half the session timeout; fetch wait bounds latency.
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    kafka_command_fetch_max_wait_ms: int = Field(default=10, ge=0, le=10_000)
    kafka_event_fetch_max_wait_ms: int = Field(default=100, ge=0, le=10_000)
    # Commands of one fetch are handled in one transaction (falling back to one by one when
    # any of them is refused), and their offsets committed together.
    kafka_command_batch_size: int = Field(default=100, ge=1, le=1000)
    kafka_event_batch_size: int = Field(default=100, ge=1, le=1000)
    # A fetch that brings records of several topics (a service's commands and the answers to
    # its saga steps) is handled in one transaction, falling back to one per topic when that
    # fails; off: one per topic always (services/runtime/app.py, ``_consume``).
    fetch_one_transaction: bool = True
    # Handled records' offsets are committed together, at most this long after their handling
    # (0: after every fetch, before the next is handled); a record delivered again meanwhile
    # finds its id in the inbox (services/runtime/offsets.py).
    kafka_commit_interval_ms: int = Field(default=500, ge=0, le=60_000)
    kafka_graceful_timeout_s: float = Field(default=15.0, gt=0)

    # Outbox relay
    relay_poll_interval_s: float = Field(default=0.5, gt=0)
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    outbox_retention_hours: int = Field(default=24 * 7, ge=1)

    # Transient failures (database down): retried with backoff, never skipped.
    retry_initial_s: float = Field(default=0.1, gt=0)
    retry_max_s: float = Field(default=5.0, gt=0)

    # SQLite: a writing engine runs its statements on the event loop's thread, without a trip
    # to the connection's thread; one that would wait for a lock still takes the trip.
    sqlite_inline: bool = True

    def database_url(self, service: str) -> str:
        """``BIANZHI_<SVC>_DATABASE_URL``, else a SQLite file per service in the data directory."""
        url = os.environ.get(f"BIANZHI_{service.upper()}_DATABASE_URL")
        if url:
            return url
        path = (self.data_dir / f"{service}.db").resolve()
        return f"sqlite+aiosqlite:///{path}"

    def sasl_password(self) -> str | None:
        """The SASL password, from the variable or from a mounted file."""
        if self.kafka_sasl_password is not None:
            return self.kafka_sasl_password.get_secret_value()
        if self.kafka_sasl_password_file is not None:
            return self.kafka_sasl_password_file.read_text().strip()
        return None


def embedded_overrides() -> dict[str, object]:
    """Consumer timings that suit the embedded broker (see BROKER.md)."""
    return {
        "kafka_session_timeout_ms": 3_000,
        "kafka_heartbeat_interval_ms": 1_000,
        "kafka_enable_idempotence": False,
    }
