"""The systemd watchdog watches the publisher's loops (issue #9): real broker, real datagram socket.

A broker stopped with SIGSTOP keeps the TCP connection open and answers nothing: the senders
wait for PUBACKs that do not come, which is the wedge the pings must stop for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from sandbox.brokers import IotBroker, write_client_certificate
from sandbox.pki import SandboxPki
from shared.config import Secret
from shared.errors import UsageError
from tests.adapters import publisher_fixtures as pf
from ztp_daemon.bundle import Bundle, BundleStore
from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.keystore import FileKeyStore
from ztp_daemon.link import LinkSettings
from ztp_daemon.machine import (
    MachineConfig,
    ProvisioningMachine,
    SharedCodecDecoder,
    State,
    StateRecord,
)
from ztp_daemon.outbox import Outbox
from ztp_daemon.publisher import (
    CONNECTION_LOOP,
    SEND_LOOP,
    BundleCredentials,
    ClientCredentials,
    Publisher,
    PublisherConfig,
)
from ztp_daemon.sdnotify import Notifier, Watchdog
from ztp_daemon.state import StateFile
from ztp_daemon.supervisor import BUNDLE_DIRECTORY, PublisherFactory, Supervisor

# WATCHDOG_USEC 0.6 s: pings every 0.3 s, pulses every 0.15 s.
_WATCHDOG_TIMEOUT = 0.6
# The loops' allowance: drain 0.2 + 2 x connect 0.4 + pulse 0.15 = 1.15 s.
_TIMINGS = {"connect_timeout": 0.4, "drain_timeout": 0.2}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def own_broker(tmp_path: Path, pki: SandboxPki) -> AsyncIterator[IotBroker]:
    """A broker this test may freeze (SIGSTOP) and thaw."""
    async with IotBroker(tmp_path / "iot", pki=pki) as broker:
        yield broker


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """The receiving end of NOTIFY_SOCKET (a short path: Unix socket paths fit in 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="/tmp/ztp-pwd-") as name:
        path = str(Path(name) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.0)  # non-blocking
        try:
            yield sock, path
        finally:
            sock.close()


def _pings(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            count += sock.recv(8192) == b"WATCHDOG=1\n"
        except BlockingIOError:
            return count


@contextlib.contextmanager
def _frozen(broker: IotBroker) -> Iterator[None]:
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
async def test_idle_publisher_keeps_pings_coming_then_a_wedged_sender_stops_them(
    own_broker: IotBroker,
    pki: SandboxPki,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path / "things")
    config = pf.fast_config(own_broker, pki, thing, **_TIMINGS)
    notifier = Notifier(address=path, watchdog_timeout=_WATCHDOG_TIMEOUT)
    with capture_logs() as events:
        async with (
            Watchdog(notifier=notifier) as watchdog,
            Outbox(tmp_path / "outbox.db") as outbox,
            Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert)) as pub,
        ):
            pub.attach_watchdog(watchdog)
            await asyncio.wait_for(pub.wait_connected(), 5)
            # Idle (nothing to send) for twice the loops' allowance: the pulse keeps them alive.
            await asyncio.sleep(1.8)
            assert _pings(sock) >= 4
            assert watchdog.check() is True
            with _frozen(own_broker):
                await asyncio.gather(*(outbox.submit(f"dt/{thing}/w", b"x") for _ in range(150)))
                await pf.wait_until(lambda: outbox.stats().in_flight == 100, within=2)
                # Within the allowance one more ping may go; after it, none.
                await asyncio.sleep(1.5)
                _pings(sock)
                await asyncio.sleep(1.0)
                assert _pings(sock) == 0
                assert outbox.stats().in_flight == 100
                assert pub.connected, "the socket is alive: only the PUBACKs are missing"
            # Thawed, the PUBACKs arrive: the senders beat again and the pings resume.
            await pf.wait_until(lambda: outbox.stats().depth == 0, within=5)
            await pf.wait_until(lambda: _pings(sock) > 0, within=2)
    withheld = [e for e in events if e["event"].startswith("watchdog pings withheld")]
    assert len(withheld) == 1
    assert withheld[0]["loops"] == [SEND_LOOP], "the connection loop itself kept turning"
    assert any(e["event"].startswith("watchdog pings resumed") for e in events)


class _SwitchableCredentials:
    """The sandbox certificate, then (after :meth:`switch`) the same with another key path."""

    def __init__(self, inner: ClientCredentials, key_file: Path) -> None:
        self._inner = inner
        self._key_file = key_file
        self._switched = False

    def switch(self) -> None:
        self._switched = True

    def current(self) -> ClientCredentials:
        if not self._switched:
            return self._inner
        return replace(self._inner, key_file=self._key_file, version="switched")


async def test_a_wedged_connection_loop_stops_the_pings(
    own_broker: IotBroker,
    pki: SandboxPki,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path / "things")
    # A key "file" that is a FIFO: reading it blocks until someone writes, as a hung
    # filesystem would, so the connection loop waits on its TLS set-up and never returns.
    fifo = tmp_path / "stuck.key"
    os.mkfifo(fifo, 0o600)
    inner = ClientCredentials(cert.cert_file, cert.key_file, "127.0.0.1", "first")
    credentials = _SwitchableCredentials(inner, fifo)
    config = pf.fast_config(own_broker, pki, thing, **_TIMINGS)
    notifier = Notifier(address=path, watchdog_timeout=_WATCHDOG_TIMEOUT)

    def unblock() -> None:
        with fifo.open("wb") as writer:  # opening for writing lets the reader's open return
            writer.write(cert.key_file.read_bytes())

    with capture_logs() as events:
        async with (
            Watchdog(notifier=notifier) as watchdog,
            Outbox(tmp_path / "outbox.db") as outbox,
            Publisher(config=config, outbox=outbox, credentials=credentials) as pub,
        ):
            pub.attach_watchdog(watchdog)
            await asyncio.wait_for(pub.wait_connected(), 5)
            credentials.switch()
            pub.request_reconnect("test: new key")
            unblocked = False
            try:
                await pf.wait_until(lambda: not pub.connected, within=2)
                # One connect pacing wait (1 s, pulsed), then the stuck read, past the
                # allowance (1.15 s) and one ping interval: no ping any more.
                await asyncio.sleep(2.8)
                _pings(sock)
                await asyncio.sleep(0.8)
                assert _pings(sock) == 0
                assert not pub.connected
                await asyncio.to_thread(unblock)
                unblocked = True
                # The read completes, the connection comes up, the loops beat: pings resume.
                await asyncio.wait_for(pub.wait_connected(), 5)
                await pf.wait_until(lambda: _pings(sock) > 0, within=2)
            finally:
                if not unblocked:
                    await asyncio.to_thread(unblock)
    withheld = [e for e in events if e["event"].startswith("watchdog pings withheld")]
    assert len(withheld) == 1
    assert withheld[0]["loops"] == [CONNECTION_LOOP, SEND_LOOP]


async def test_attach_needs_a_running_publisher_and_only_one_watchdog(
    own_broker: IotBroker, pki: SandboxPki, tmp_path: Path
) -> None:
    thing = pf.unique_thing_name()
    cert = write_client_certificate(pki, thing, tmp_path / "things")
    config = pf.fast_config(own_broker, pki, thing, **_TIMINGS)
    watchdog = Watchdog(notifier=Notifier(address=None), interval=0.3)
    async with Outbox(tmp_path / "outbox.db") as outbox:
        publisher = Publisher(config=config, outbox=outbox, credentials=pf.credentials_for(cert))
        with pytest.raises(UsageError):
            publisher.attach_watchdog(watchdog)
        async with publisher:
            publisher.attach_watchdog(watchdog)
            with pytest.raises(UsageError):
                publisher.attach_watchdog(watchdog)
            with pytest.raises(UsageError, match="already registered"):
                watchdog.register(CONNECTION_LOOP)
        # Stopped on purpose: its loops are no longer watched (the names are free again).
        watchdog.register(CONNECTION_LOOP)
        watchdog.register(SEND_LOOP)


# -- through the supervisor --------------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (the AirVantage link only retries against it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _factory(
    state_dir: Path, config: PublisherConfig, opened: list[tuple[Outbox, Publisher]]
) -> PublisherFactory:
    """What ``ztp_daemon.__main__`` builds, without the ingestion socket and heartbeat."""

    @contextlib.asynccontextmanager
    async def open_publisher(bundle: Bundle) -> AsyncIterator[object]:
        del bundle
        credentials = BundleCredentials(BundleStore(state_dir / BUNDLE_DIRECTORY))
        async with (
            Outbox(state_dir / "outbox.sqlite3") as outbox,
            Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
        ):
            opened.append((outbox, publisher))
            yield publisher

    return open_publisher


async def test_supervisor_watches_the_publisher_it_starts(
    own_broker: IotBroker,
    pki: SandboxPki,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    serial = pf.unique_thing_name()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cert = write_client_certificate(pki, serial, tmp_path / "things")
    certificate_id = "c" * 64
    version = BundleStore(state_dir / BUNDLE_DIRECTORY).commit(
        certificate_pem=cert.cert_file.read_text(),
        endpoint="127.0.0.1",
        certificate_id=certificate_id,
        key_pem=cert.key_file.read_bytes(),
    )
    # Resumed provisioned: Start hands out StartPublisher at once, whatever the link does.
    record = StateRecord(
        State.PROVISIONED,
        "r-1",
        build_csr(ec.generate_private_key(ec.SECP256R1()), CsrSubject(serial)),
        attempts=1,
        bundle_version=version,
        certificate_id=certificate_id,
    )
    opened: list[tuple[Outbox, Publisher]] = []
    supervisor = Supervisor(
        machine=ProvisioningMachine(
            MachineConfig(serial=serial),
            decoder=SharedCodecDecoder(),
            rng=random.Random(3),
            record=record,
        ),
        serial=serial,
        subject=CsrSubject(serial),
        keystore=FileKeyStore(state_dir),
        state_file=StateFile(state_dir),
        bundles=BundleStore(state_dir / BUNDLE_DIRECTORY),
        link_settings=LinkSettings(
            serial=serial,
            password=Secret("not-a-real-password"),
            host="127.0.0.1",
            port=_closed_port(),
            tls=False,
            connect_timeout=0.5,
            backoff_base=0.5,
            backoff_cap=1.0,
        ),
        publisher_factory=_factory(
            state_dir, pf.fast_config(own_broker, pki, serial, **_TIMINGS), opened
        ),
        notifier=Notifier(address=path, watchdog_timeout=_WATCHDOG_TIMEOUT),
    )
    stop = asyncio.Event()

    async def shutdown() -> None:
        await stop.wait()

    connected: Callable[[], bool] = lambda: bool(opened) and opened[0][1].connected  # noqa: E731
    with capture_logs() as events:
        async with asyncio.TaskGroup() as group:
            group.create_task(supervisor.run(shutdown=shutdown), name="test.daemon")
            try:
                await pf.wait_until(connected, within=5)
                [(outbox, _publisher)] = opened
                await pf.wait_until(lambda: _pings(sock) > 0, within=2)
                with _frozen(own_broker):
                    await outbox.submit(f"dt/{serial}/w", b"x")
                    await pf.wait_until(lambda: outbox.stats().in_flight == 1, within=2)
                    await asyncio.sleep(1.5)
                    _pings(sock)
                    await asyncio.sleep(1.0)
                    assert _pings(sock) == 0, "the machine loop beats, the senders do not"
            finally:
                stop.set()
    withheld = [e for e in events if e["event"].startswith("watchdog pings withheld")]
    assert len(withheld) == 1
    assert withheld[0]["loops"] == [SEND_LOOP]
