"""The MQTT publisher against the sandbox IoT broker (mosquitto, mutual TLS), and its pure parts."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import json
import random
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import structlog
from structlog.typing import EventDict, WrappedLogger

from sandbox.brokers import ClientCertificate, IotBroker, write_client_certificate
from sandbox.pki import SandboxPki
from shared.errors import ConfigError, TransportError, UsageError
from tests.adapters import publisher_fixtures as pf
from tests.sandbox.conftest import running_on_private_loops
from ztp_daemon.bundle import BundleStore
from ztp_daemon.heartbeat import (
    Heartbeat,
    MemoryInfo,
    SystemSample,
    health_payload,
    sample_system,
)
from ztp_daemon.outbox import Outbox, OutboxLimits, OutboxStats
from ztp_daemon.publisher import (
    AWS_ALPN_PROTOCOL,
    Backoff,
    BundleCredentials,
    ClientCredentials,
    ConnectError,
    FileCredentials,
    Publisher,
    PublisherConfig,
    PublisherStats,
    RatePacer,
    build_tls_context,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Iterator[IotBroker]:
    """A broker shared by the tests that never stop it."""
    with running_on_private_loops(IotBroker(tmp_path_factory.mktemp("iot"), pki=pki)) as shared:
        yield shared


@pytest.fixture
async def own_broker(tmp_path: Path, pki: SandboxPki) -> AsyncIterator[IotBroker]:
    """A broker this test may stop and restart."""
    mine = IotBroker(tmp_path / "iot", pki=pki)
    async with mine:
        yield mine


def with_time(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    event["t"] = time.monotonic()
    return event


# -- pure parts --------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_cap() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(7))
    assert backoff.delay(0) == 0.0
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (60, 8.0)]:
        delays = [backoff.delay(attempt) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8, "full jitter spreads over the whole range"
        assert min(delays) < ceiling * 0.2


def test_backoff_is_reproducible_with_a_seed() -> None:
    first = Backoff(1.0, 60.0, random.Random(3))
    second = Backoff(1.0, 60.0, random.Random(3))
    assert [first.delay(n) for n in range(1, 10)] == [second.delay(n) for n in range(1, 10)]


def test_rate_pacer_spaces_events() -> None:
    pacer = RatePacer(100.0)
    waits = [pacer.reserve(10.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    assert pacer.reserve(11.0) == 0.0, "an idle pacer does not bank a burst"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"keepalive": 29}, "publisher.keepalive"),
        ({"keepalive": 1201}, "publisher.keepalive"),
        ({"min_connect_interval": 0.5}, "publisher.min_connect_interval"),
        ({"port": 0}, "publisher.port"),
        ({"thing_name": ""}, "publisher.thing_name"),
        ({"backoff_base": 10.0, "backoff_cap": 5.0}, "publisher.backoff_base"),
        ({"drain_timeout": 0}, "publisher.drain_timeout"),
        ({"publish_rate": 0.0}, "publisher.publish_rate"),
        ({"message_id_property": ""}, "publisher.message_id_property"),
    ],
)
def test_config_validates_when_built(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PublisherConfig(**{"thing_name": "t", **overrides})  # type: ignore[arg-type]
    assert caught.value.key == key


def test_config_bounds_and_alpn_default() -> None:
    assert PublisherConfig(thing_name="t", keepalive=30).keepalive == 30
    assert PublisherConfig(thing_name="t", keepalive=1200).keepalive == 1200
    assert PublisherConfig(thing_name="t", port=443).use_alpn
    assert not PublisherConfig(thing_name="t", port=8883).use_alpn
    assert PublisherConfig(thing_name="t", port=8883, alpn=True).use_alpn
    assert PublisherConfig(thing_name="t").publish_rate == 100.0, "AWS's per-connection limit"


@pytest.mark.parametrize(
    ("name", "message_id"),
    [
        ("ztp-id", "abc-1"),
        ("ztp-id", "0123456789abcdef-18446744073709551615"),
        ("ztp-id", "é-1"),
        # Around the one-byte lengths' edge: 9 + 2 + 116 = 127 bytes, then 128 (two bytes).
        ("ztp-id", "x" * 116),
        ("ztp-id", "x" * 117),
        ("ztp-id", "0123456789abcdef-" + "9" * 200),
        ("ztp-id", "y" * 300),  # the value's length has a high byte
        ("message-identifier", "z" * 120),
        ("n", ""),
    ],
)
def test_message_id_properties_pack_like_paho(name: str, message_id: str) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from ztp_daemon.publisher import message_id_properties

    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.UserProperty = (name, message_id)
    ours = message_id_properties(name)(message_id)
    assert isinstance(ours, Properties), "aiomqtt's publish is typed for paho's Properties"
    assert ours.pack() == reference.pack()  # type: ignore[no-untyped-call]
    assert repr(message_id.encode())[2:-1] in str(ours)


def test_message_id_properties_need_a_name() -> None:
    from ztp_daemon.publisher import message_id_properties

    with pytest.raises(UsageError):
        message_id_properties("")


def test_connect_error_is_a_transport_error() -> None:
    error = ConnectError("refused")
    assert isinstance(error, TransportError)
    assert error.reason == "refused"


async def test_tls_context_offers_the_aws_alpn_and_presents_the_certificate(
    pki: SandboxPki, tmp_path: Path
) -> None:
    """A real TLS server sees our ALPN protocol and our client certificate's CN."""
    cert_file, key_file = pki.server_certificate("alpn-server")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    server_context.load_cert_chain(str(cert_file), str(key_file))
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.set_alpn_protocols([AWS_ALPN_PROTOCOL])
    seen: asyncio.Future[tuple[str | None, object]] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        seen.set_result((tls.selected_alpn_protocol(), tls.getpeercert()["subject"]))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    thing = write_client_certificate(pki, "alpn-thing", tmp_path)
    credentials = ClientCredentials(thing.cert_file, thing.key_file, "127.0.0.1", "v1")
    async with server:
        for alpn in (True, False):
            context = build_tls_context(credentials, ca_file=pki.ca_file, alpn=alpn)
            seen = asyncio.get_running_loop().create_future()
            _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            protocol, subject = await asyncio.wait_for(seen, 5)
            writer.close()
            assert protocol == (AWS_ALPN_PROTOCOL if alpn else None)
            assert (("commonName", "alpn-thing"),) in subject  # type: ignore[operator]


# -- against the sandbox IoT broker ------------------------------------------------------------


async def test_publish_round_trip_with_stable_ids(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(broker, pki, thing)
    async with (
        pf.observe(broker, f"dt/{thing}/#") as observer,
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)) as publisher,
    ):
        ids = await asyncio.gather(
            *(outbox.submit(f"dt/{thing}/telemetry", f"m{i}".encode()) for i in range(200))
        )
        await observer.wait_for(200)
        await pf.wait_until(lambda: outbox.stats().depth == 0)
        assert publisher.stats().published == 200
    assert observer.ids == set(ids)
    by_id = {m.message_id: m.payload for m in observer.messages}
    assert by_id[ids[7]] == b"m7"
    assert {m.topic for m in observer.messages} == {f"dt/{thing}/telemetry"}
    async with Outbox(tmp_path / "outbox.db") as reopened:
        assert reopened.stats().depth == 0, "acked rows are deleted"


async def test_mqtt311_mode_publishes_without_ids(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(broker, pki, thing, message_id_property=None)
    async with (
        pf.observe(broker, f"dt/{thing}/#") as observer,
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)),
    ):
        await outbox.put(f"dt/{thing}/x", b"plain")
        await observer.wait_for(1)
    assert observer.messages[0].message_id is None


async def test_broker_outage_loses_nothing(
    own_broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """1,000 messages produced while the broker is down all arrive after it comes back."""
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(own_broker, pki, thing)
    credentials = pf.GatedCredentials(pf.credentials_for(cert))
    async with (
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
    ):
        await asyncio.wait_for(publisher.wait_connected(), 5)
        await own_broker.stop()
        with structlog.testing.capture_logs() as logs:
            ids = []
            for batch in range(10):
                ids += await asyncio.gather(
                    *(
                        outbox.submit(f"dt/{thing}/x", f"m{batch * 100 + i}".encode())
                        for i in range(100)
                    )
                )
            await asyncio.sleep(1.5)  # reconnect attempts fail meanwhile
            # Hold the next attempt until the observer listens on the restarted broker.
            credentials.close()
            await own_broker.start()
        assert not publisher.connected
        assert outbox.stats().depth == 1000
        failures = [e for e in logs if e["event"] == "publisher.connect_failed"]
        assert failures, "each failed attempt is logged"
        assert all(e["reason"] for e in failures)
        async with pf.observe(own_broker, f"dt/{thing}/#") as observer:
            credentials.open()
            await observer.wait_for(1000, within=20)
            await pf.wait_until(lambda: outbox.stats().depth == 0)
        assert publisher.stats().connects >= 2
    assert observer.ids == set(ids), "all 1,000 arrive (duplicates allowed, no loss)"


async def test_reconnects_are_paced_and_logged_with_reasons(
    own_broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """Against a stopped broker: attempts at least 1 s apart (1 CONNECT/s), each reason logged."""
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(own_broker, pki, thing, backoff_base=0.01, backoff_cap=0.01)
    await own_broker.stop()
    with structlog.testing.capture_logs(processors=[with_time]) as logs:
        async with (
            Outbox(tmp_path / "outbox.db") as outbox,
            Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)),
        ):
            await asyncio.sleep(2.5)
    attempts = [e["t"] for e in logs if e["event"] == "publisher.connecting"]
    failures = [e for e in logs if e["event"] == "publisher.connect_failed"]
    assert 2 <= len(attempts) <= 3
    assert all(b - a >= 0.99 for a, b in itertools.pairwise(attempts))
    assert len(failures) >= 2
    assert all("refused" in e["reason"].lower() for e in failures), failures


def _attempts_at_least(publisher: Publisher, count: int) -> bool:
    return publisher.stats().attempts >= count


@pytest.mark.slow
async def test_backoff_starts_over_after_a_good_connection(
    own_broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(own_broker, pki, thing)
    with structlog.testing.capture_logs() as logs:
        async with (
            Outbox(tmp_path / "outbox.db") as outbox,
            Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)) as pub,
        ):
            for round_ in (1, 2):
                await asyncio.wait_for(pub.wait_connected(), 10)
                await own_broker.stop()
                # The lost connection's attempt, then one refused attempt.
                await pf.wait_until(functools.partial(_attempts_at_least, pub, 2 * round_ + 1))
                await own_broker.start()
    failures = [e["attempt"] for e in logs if e["event"] == "publisher.connect_failed"]
    # Each loss counts from 1 again: [1 (lost), 2 (refused)], then [1 (lost), 2 (refused)].
    assert failures[:2] == [1, 2]
    assert failures.count(1) == 2, failures


async def test_refused_certificate_is_retried_with_the_reason(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """A certificate from another CA fails the handshake; the reason names TLS."""
    thing = pf.unique_thing_name()
    other_ca = SandboxPki.load_or_create(tmp_path / "other-ca")
    cert = write_client_certificate(other_ca, thing, tmp_path)
    config = pf.fast_config(broker, pki, thing, connect_timeout=1.0)
    with structlog.testing.capture_logs() as logs:
        async with (
            Outbox(tmp_path / "outbox.db") as outbox,
            Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)) as pub,
        ):
            await outbox.put(f"dt/{thing}/x", b"kept")
            await pf.wait_until(lambda: pub.stats().last_error is not None)
            assert not pub.connected
        assert outbox.stats().depth == 1, "nothing is lost while it cannot connect"
    failures = [e for e in logs if e["event"] == "publisher.connect_failed"]
    assert failures
    assert not any("PRIVATE KEY" in str(e) for e in logs)


async def test_new_certificate_reconnects_without_losing_messages(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """The bundle's certificate changes: drain, reconnect with it; the old one is revoked."""
    thing = pf.unique_thing_name()
    old = write_client_certificate(pki, thing, tmp_path / "old")
    live = tmp_path / "live"
    live.mkdir()
    cert_file, key_file = live / "cert.pem", live / "key.pem"
    cert_file.write_bytes(old.cert_file.read_bytes())
    key_file.write_bytes(old.key_file.read_bytes())
    credentials = FileCredentials(cert_file, key_file, "127.0.0.1")
    config = pf.fast_config(broker, pki, thing)
    async with (
        pf.observe(broker, f"dt/{thing}/#") as observer,
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
    ):
        await asyncio.wait_for(publisher.wait_connected(), 5)
        first = await asyncio.gather(
            *(outbox.submit(f"dt/{thing}/x", f"a{i}".encode()) for i in range(300))
        )
        new = write_client_certificate(pki, thing, tmp_path / "new")
        # Revoke the old certificate: only a reconnect with the new one can succeed now.
        await broker.reload_crl([old.serial])
        for source, target in ((new.key_file, key_file), (new.cert_file, cert_file)):
            staging = target.with_suffix(".tmp")
            staging.write_bytes(source.read_bytes())
            staging.replace(target)
        await pf.wait_until(lambda: publisher.stats().connects >= 2)
        second = await asyncio.gather(
            *(outbox.submit(f"dt/{thing}/x", f"b{i}".encode()) for i in range(300))
        )
        await observer.wait_for(600)
        await pf.wait_until(lambda: outbox.stats().depth == 0)
        assert publisher.stats().connects == 2
    await broker.reload_crl([])
    assert observer.ids >= set(first) | set(second)


async def test_shutdown_drains_in_flight_and_keeps_the_rest(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """Leaving the context stops sending, waits for PUBACKs, and leaves unsent rows on disk."""
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(broker, pki, thing, publish_rate=500.0)
    with structlog.testing.capture_logs() as logs:
        async with (
            Outbox(tmp_path / "outbox.db") as outbox,
            Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)) as pub,
        ):
            await asyncio.gather(
                *(outbox.submit(f"dt/{thing}/x", f"m{i}".encode()) for i in range(2000))
            )
            await pf.wait_until(lambda: pub.stats().published >= 100)
            began = time.monotonic()
        elapsed = time.monotonic() - began
        published = pub.stats().published
        assert outbox.stats().in_flight == 0
    assert elapsed < config.drain_timeout + 1.0
    assert any(e["event"] == "publisher.drained" for e in logs)
    async with Outbox(tmp_path / "outbox.db") as reopened:
        assert reopened.stats().depth == 2000 - published, "acked gone, the rest kept"


async def test_publish_rate_is_per_connection(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """AWS allows 100 publishes/s per connection: 100 senders together keep to the rate."""
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(broker, pki, thing, publish_rate=200.0)
    async with (
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)) as pub,
    ):
        await asyncio.wait_for(pub.wait_connected(), 5)
        await asyncio.gather(*(outbox.submit(f"dt/{thing}/x", b"%d" % i) for i in range(300)))
        began = time.monotonic()
        await pf.wait_until(lambda: pub.stats().published >= 300)
        elapsed = time.monotonic() - began
    assert 1.3 < elapsed < 5.0, elapsed


async def test_shutdown_while_disconnected_is_prompt(
    own_broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    config = pf.fast_config(own_broker, pki, thing, backoff_base=5.0, backoff_cap=5.0)
    await own_broker.stop()
    async with Outbox(tmp_path / "outbox.db") as outbox:
        publisher = Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert))
        async with publisher:
            await pf.wait_until(lambda: publisher.stats().last_error is not None)
            began = time.monotonic()
        # The backoff is 5 s: a shutdown that waited for it would take that long.
        assert time.monotonic() - began < 2.5


# -- the heartbeat -----------------------------------------------------------------------------

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def test_health_payload_reports_everything() -> None:
    system = SystemSample(
        load=(0.123, 0.5, 1.0),
        memory=MemoryInfo(rss_bytes=40 << 20, available_bytes=1 << 30, total_bytes=2 << 30),
        system_uptime_s=86400.4,
        certificate_not_after=NOW + dt.timedelta(days=10),
    )
    outbox = OutboxStats(depth=3, bytes=30, in_flight=1, dropped=2, refused=4, accepted=9, acked=6)
    publisher = PublisherStats(connected=True, connects=2, attempts=3, published=6, last_error="x")
    body = json.loads(
        health_payload(now=NOW, uptime_s=61.6, system=system, outbox=outbox, publisher=publisher)
    )
    assert body == {
        "ts": "2026-06-01T12:00:00Z",
        "uptime_s": 62,
        "system_uptime_s": 86400,
        "load": [0.12, 0.5, 1.0],
        "memory": {"rss_bytes": 40 << 20, "available_bytes": 1 << 30, "total_bytes": 2 << 30},
        "outbox": {"depth": 3, "bytes": 30, "in_flight": 1, "dropped": 2, "refused": 4},
        "publisher": {"connected": True, "connects": 2, "published": 6},
        "certificate": {"not_after": "2026-06-11T12:00:00Z", "expires_in_s": 864000},
    }


def test_health_payload_with_nothing_known() -> None:
    system = SystemSample(None, MemoryInfo(None, None, None), None, None)
    stats = OutboxStats(0, 0, 0, 0, 0, 0, 0)
    body = json.loads(
        health_payload(now=NOW, uptime_s=0, system=system, outbox=stats, publisher=None)
    )
    assert body["load"] is None
    assert body["certificate"] is None
    assert body["publisher"] is None
    with pytest.raises(UsageError):
        health_payload(
            now=NOW.replace(tzinfo=None), uptime_s=0, system=system, outbox=stats, publisher=None
        )


def test_sample_system_reads_proc(pki: SandboxPki, tmp_path: Path) -> None:
    fake = tmp_path / "proc"
    (fake / "self").mkdir(parents=True)
    (fake / "self" / "status").write_text("Name:\tztp\nVmRSS:\t  4096 kB\n")
    (fake / "meminfo").write_text("MemTotal:  2048 kB\nMemAvailable:  1024 kB\n")
    (fake / "uptime").write_text("123.45 67.8\n")
    cert = write_client_certificate(pki, "expiry-thing", tmp_path)
    sample = sample_system(cert.cert_file, proc=fake)
    assert sample.memory == MemoryInfo(4096 * 1024, 1024 * 1024, 2048 * 1024)
    assert sample.system_uptime_s == 123.45
    assert sample.certificate_not_after is not None
    assert sample.certificate_not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=3000)
    empty = sample_system(tmp_path / "missing.pem", proc=tmp_path / "nothing")
    assert empty.memory == MemoryInfo(None, None, None)
    assert empty.certificate_not_after is None
    real = sample_system(None)
    assert real.memory.rss_bytes is not None
    assert real.memory.rss_bytes > 1 << 20


async def test_heartbeat_arrives_through_the_publisher(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    credentials = pf.credentials_for(cert)
    config = pf.fast_config(broker, pki, thing)
    async with (
        pf.observe(broker, f"dt/{thing}/health") as observer,
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
        Heartbeat(
            outbox=outbox,
            topic=f"dt/{thing}/health",
            interval=0.2,
            credentials=credentials,
            publisher=publisher,
        ) as heartbeat,
    ):
        await observer.wait_for(2)
    assert heartbeat.beats >= 2
    body = json.loads(observer.messages[-1].payload)
    assert body["certificate"]["expires_in_s"] > 3000 * 86400
    assert body["publisher"]["connected"] is True
    assert body["memory"]["rss_bytes"] > 0
    assert set(body["outbox"]) == {"depth", "bytes", "in_flight", "dropped", "refused"}


async def test_heartbeat_skips_a_beat_when_the_outbox_is_full(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db", limits=OutboxLimits(max_messages=1)) as outbox:
        heartbeat = Heartbeat(outbox=outbox, topic="dt/t/health")
        assert await heartbeat.beat() is not None
        with structlog.testing.capture_logs() as logs:
            assert await heartbeat.beat() is None
        assert [e["event"] for e in logs] == ["outbox.refused", "heartbeat.skipped"]
    with pytest.raises(UsageError):
        Heartbeat(outbox=outbox, topic="dt/t/health", interval=0)


# -- the daemon killed and restarted -----------------------------------------------------------


class DaemonProcess:
    """The publishing half of the daemon in a child process (tests.adapters.publisher_fixtures)."""

    def __init__(self, args: list[str], log: BinaryIO) -> None:
        self.args = args
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.adapters.publisher_fixtures",
            "daemon",
            *self.args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(15):
            assert await self.process.stdout.readline() == b"ready\n"

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
async def test_sigkill_with_a_backlog_loses_nothing(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    """Messages accepted over the socket, daemon SIGKILLed with a backlog, restarted: all arrive."""
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path)
    sock = Path("/tmp") / f"ztp-{thing}.sock"
    args = [
        str(tmp_path / "outbox.db"),
        str(sock),
        str(cert.cert_file),
        str(cert.key_file),
        str(pki.ca_file),
        str(broker.port),
        thing,
        "400",  # paced, so a backlog builds up in the outbox
    ]
    log = (tmp_path / "daemon.log").open("ab")
    daemon = DaemonProcess(args, log)
    try:
        async with pf.observe(broker, f"dt/{thing}/data") as observer:
            await daemon.start()
            reader, writer = await asyncio.open_unix_connection(str(sock))
            lines = b"".join(
                json.dumps({"topic": f"dt/{thing}/data", "payload": f"m{i}"}).encode() + b"\n"
                for i in range(1500)
            )
            writer.write(lines)
            accepted: list[str] = []
            async with asyncio.timeout(15):
                while len(accepted) < 1500:
                    reply = json.loads(await reader.readline())
                    assert reply["ok"], reply
                    accepted.append(reply["id"])
            await daemon.kill()
            writer.close()
            assert len(observer.payloads) < 1500, "the kill must leave a backlog"
            backlog = 1500 - len(observer.payloads)
            await daemon.start()  # the same outbox, socket path and certificate
            await observer.wait_for(1500, within=30)
        assert observer.ids >= set(accepted)
        assert backlog > 100
    finally:
        await daemon.kill()
        log.close()
        await asyncio.to_thread(sock.unlink, missing_ok=True)


# -- credentials from the bundle store ---------------------------------------------------------


def _commit(store: BundleStore, cert: ClientCertificate) -> int:
    pem = cert.cert_file.read_text()
    return store.commit(
        certificate_pem=pem,
        endpoint="127.0.0.1",
        certificate_id=f"{cert.serial:064x}",
        key_pem=cert.key_file.read_bytes(),
    )


def test_bundle_credentials_follow_the_current_bundle(pki: SandboxPki, tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundle")
    source = BundleCredentials(store)
    assert source.current() is None
    first = write_client_certificate(pki, "bundle-thing", tmp_path / "a")
    _commit(store, first)
    current = source.current()
    assert current is not None
    assert current.endpoint == "127.0.0.1"
    assert current.cert_file.read_bytes() == first.cert_file.read_bytes()
    assert current.key_file.read_bytes() == first.key_file.read_bytes()
    second = write_client_certificate(pki, "bundle-thing", tmp_path / "b")
    _commit(store, second)
    rotated = source.current()
    assert rotated is not None
    assert rotated.version != current.version
    assert rotated.cert_file.read_bytes() == second.cert_file.read_bytes()
    keyless = BundleStore(tmp_path / "keyless")
    keyless.commit(
        certificate_pem=first.cert_file.read_text(),
        endpoint="127.0.0.1",
        certificate_id="ab" * 32,
        key_reference="pkcs11:object=ztp",
    )
    with pytest.raises(UsageError):
        BundleCredentials(keyless).current()


async def test_a_new_bundle_is_picked_up_without_losing_messages(
    broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    store = BundleStore(tmp_path / "bundle")
    old = write_client_certificate(pki, thing, tmp_path / "old")
    _commit(store, old)
    config = pf.fast_config(broker, pki, thing)
    async with (
        pf.observe(broker, f"dt/{thing}/#") as observer,
        Outbox(tmp_path / "outbox.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=BundleCredentials(store)) as pub,
    ):
        await asyncio.wait_for(pub.wait_connected(), 5)
        ids = await outbox.submit_many(f"dt/{thing}/x", [b"%d" % i for i in range(200)])
        await broker.reload_crl([old.serial])
        _commit(store, write_client_certificate(pki, thing, tmp_path / "new"))
        await pf.wait_until(lambda: pub.stats().connects >= 2)
        ids += await outbox.submit_many(f"dt/{thing}/x", [b"n%d" % i for i in range(200)])
        await observer.wait_for(400)
    await broker.reload_crl([])
    assert observer.ids >= set(ids)
