"""The Kafka security settings reach every client: the services' broker and plain clients."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from faststream.security import SASLScram512

from services.runtime.broker import client_options, security_from
from services.runtime.settings import Settings


def sasl_ssl(tmp_path: Path, **extra: object) -> Settings:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    values: dict[str, object] = {
        "kafka_bootstrap": "kafka-0.kafka:9093",
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "bianzhi-orgs",
        "kafka_sasl_password_file": secret,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


def test_plaintext_needs_no_security() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:9092")
    assert security_from(settings) is None
    assert client_options(settings, client_id="x") == {
        "bootstrap_servers": "127.0.0.1:9092",
        "client_id": "x",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_ssl_with_a_mounted_password_file(tmp_path: Path) -> None:
    settings = sasl_ssl(tmp_path)
    security = security_from(settings)
    assert isinstance(security, SASLScram512)
    assert security.use_ssl is True
    assert security.username == "bianzhi-orgs"
    assert security.password == "s3cret"
    opts = client_options(settings, client_id="bianzhi-cli")
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("bianzhi-orgs", "s3cret")
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_sasl_without_credentials_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u")
    with pytest.raises(ValueError, match="BIANZHI_KAFKA_SASL_PASSWORD"):
        client_options(settings, client_id="x")
