"""sd_notify against a real datagram socket playing systemd, and the watchdog's loop checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import secrets
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sandbox.brokers import DeviceBroker
from sandbox.pki import SandboxPki
from shared.errors import ConfigError, UsageError
from ztp_daemon.bundle import BundleStore
from ztp_daemon.config import load_device_config
from ztp_daemon.keystore import FileKeyStore
from ztp_daemon.machine import (
    MachineConfig,
    ProvisioningMachine,
    SharedCodecDecoder,
    State,
    StateRecord,
)
from ztp_daemon.sdnotify import (
    WATCHDOG_TASK_NAME,
    Heartbeats,
    Notifier,
    Watchdog,
    notify_address,
    watchdog_timeout,
)
from ztp_daemon.state import StateFile
from ztp_daemon.supervisor import BUNDLE_DIRECTORY, Supervisor, link_settings

# Short: a Unix socket path must fit in 108 bytes, and pytest's tmp_path can be longer.
_SOCKET_DIR_PREFIX = "/tmp/ztp-sdn-"


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: one bound datagram socket, read without blocking."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def env(self, *, watchdog_usec: int | None = None, pid: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.env_value}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
            env["WATCHDOG_PID"] = str(os.getpid() if pid is None else pid)
        return env

    async def receive(self) -> str:
        async with asyncio.timeout(2.0):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 8192)
        return data.decode()

    def drain(self) -> list[str]:
        return [datagram.decode() for datagram in _drain_socket(self.sock)]


def _bound(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.0)  # non-blocking
    return sock


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=_SOCKET_DIR_PREFIX) as name:
        yield Path(name)


@pytest.fixture
def systemd(socket_dir: Path) -> Iterator[FakeSystemd]:
    path = socket_dir / "notify"
    sock = _bound(str(path))
    try:
        yield FakeSystemd(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"ztp-test-{secrets.token_hex(8)}"
    sock = _bound(b"\0" + name.encode())
    try:
        yield FakeSystemd(sock, f"@{name}")
    finally:
        sock.close()


async def _beat_until(watchdog: Watchdog, name: str, stop: asyncio.Event, every: float) -> None:
    while not stop.is_set():
        watchdog.beat(name)
        await asyncio.sleep(every)


@pytest.fixture
async def loop_tasks() -> AsyncIterator[asyncio.TaskGroup]:
    async with asyncio.TaskGroup() as group:
        yield group


# --- the protocol ---------------------------------------------------------------------------


async def test_ready_status_watchdog_arrive_in_order(
    systemd: FakeSystemd, loop_tasks: asyncio.TaskGroup
) -> None:
    notifier = Notifier.from_env(systemd.env(watchdog_usec=200_000))
    assert notifier.enabled
    assert notifier.watchdog_timeout == pytest.approx(0.2)
    assert notifier.ready(status="state loaded")
    assert notifier.status("waiting for certificate")
    stop = asyncio.Event()
    async with Watchdog(notifier=notifier) as watchdog:
        assert watchdog.interval == pytest.approx(0.1)
        assert watchdog.beat_period == pytest.approx(0.05)
        watchdog.register("main")
        loop_tasks.create_task(_beat_until(watchdog, "main", stop, 0.01))
        received = [await systemd.receive() for _ in range(4)]
        stop.set()
    assert notifier.stopping()
    assert await systemd.receive() == "STOPPING=1\n"
    assert received == [
        "READY=1\nSTATUS=state loaded\n",
        "STATUS=waiting for certificate\n",
        "WATCHDOG=1\n",
        "WATCHDOG=1\n",
    ]


async def test_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env(abstract_systemd.env())
    assert notifier.ready()
    assert await abstract_systemd.receive() == "READY=1\n"


async def test_status_is_one_printable_line(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env(systemd.env())
    notifier.status("line one\nline\ttwo\r\n")
    assert await systemd.receive() == "STATUS=line one line two\n"
    notifier.status("x" * 500)
    text = await systemd.receive()
    assert text.startswith("STATUS=xxx")
    assert text.endswith("...\n")
    assert len(text) == len("STATUS=\n") + 200


async def test_unset_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_timeout is None
    assert not notifier.ready(status="x")
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    async with Watchdog(notifier=notifier) as watchdog:
        assert not watchdog.active
        assert watchdog.interval is None
        watchdog.register("main")
        watchdog.beat("main")
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert WATCHDOG_TASK_NAME not in names
        with pytest.raises(UsageError):
            watchdog.beat("mian")


async def test_watchdog_without_socket_runs_no_task() -> None:
    # A watchdog asked for but nowhere to send to: nothing runs.
    notifier = Notifier.from_env({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())})
    async with Watchdog(notifier=notifier) as watchdog:
        assert watchdog.interval == pytest.approx(0.05)
        assert not watchdog.active
        assert WATCHDOG_TASK_NAME not in {task.get_name() for task in asyncio.all_tasks()}


async def test_watchdog_pid_of_another_process_disables_the_watchdog(
    systemd: FakeSystemd,
) -> None:
    notifier = Notifier.from_env(systemd.env(watchdog_usec=100_000, pid=os.getpid() + 1))
    assert notifier.watchdog_timeout is None
    async with Watchdog(notifier=notifier) as watchdog:
        assert not watchdog.active
        await asyncio.sleep(0.1)
    assert systemd.drain() == []


async def test_vanished_socket_logs_once_and_recovers(socket_dir: Path) -> None:
    path = socket_dir / "notify"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs() as events:
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        sock = _bound(str(path))
        try:
            assert notifier.watchdog()
            assert sock.recv(100) == b"WATCHDOG=1\n"
        finally:
            sock.close()
    assert [e["event"] for e in events] == [
        "sd_notify report not delivered",
        "sd_notify reports delivered again",
    ]
    assert events[0]["error"] == "ENOENT"


# --- the watchdog and the main loops --------------------------------------------------------


async def test_no_ping_after_a_loop_is_wedged(
    systemd: FakeSystemd, loop_tasks: asyncio.TaskGroup
) -> None:
    notifier = Notifier.from_env(systemd.env(watchdog_usec=200_000))
    healthy_stop, wedged_stop = asyncio.Event(), asyncio.Event()
    with capture_logs() as events:
        async with Watchdog(notifier=notifier) as watchdog:
            watchdog.register("publisher")
            watchdog.register("link")
            loop_tasks.create_task(_beat_until(watchdog, "publisher", healthy_stop, 0.01))
            loop_tasks.create_task(_beat_until(watchdog, "link", wedged_stop, 0.01))
            # Alive: pings keep coming.
            assert [await systemd.receive() for _ in range(3)] == ["WATCHDOG=1\n"] * 3
            wedged_stop.set()  # the link loop stops beating, as if stuck on an await
            # One ping may still be in flight within the loop's allowance (one interval);
            # after twice that, none.
            await asyncio.sleep(0.25)
            systemd.drain()
            await asyncio.sleep(0.35)
            assert systemd.drain() == []
            assert watchdog.check() is False
            assert systemd.drain() == []
        healthy_stop.set()
    withheld = [e for e in events if e["event"].startswith("watchdog pings withheld")]
    assert len(withheld) == 1, "a wedged loop is logged once, not on every tick"
    assert withheld[0]["loops"] == ["link"]
    assert withheld[0]["log_level"] == "error"


async def test_pings_resume_when_the_loop_beats_again(systemd: FakeSystemd) -> None:
    now = [100.0]
    notifier = Notifier.from_env(systemd.env())
    watchdog = Watchdog(notifier=notifier, interval=10.0, clock=lambda: now[0])
    watchdog.register("link")
    with capture_logs() as events:
        assert watchdog.check()
        now[0] += 10.5
        assert not watchdog.check()
        assert not watchdog.check()
        watchdog.beat("link")
        assert watchdog.check()
    assert systemd.drain() == ["WATCHDOG=1\n", "WATCHDOG=1\n"]
    assert [e["event"] for e in events] == [
        "watchdog pings withheld: main loop not responding",
        "watchdog pings resumed: every main loop responds again",
    ]


async def test_unregistered_loop_no_longer_holds_pings(systemd: FakeSystemd) -> None:
    now = [0.0]
    notifier = Notifier.from_env(systemd.env())
    watchdog = Watchdog(notifier=notifier, interval=1.0, clock=lambda: now[0])
    watchdog.register("provisioning", within=5.0)
    watchdog.register("publisher")
    now[0] = 3.0
    watchdog.beat("publisher")
    assert watchdog.check(), "provisioning may stay quiet for 5 s"
    now[0] = 6.0
    watchdog.beat("publisher")
    assert not watchdog.check()
    watchdog.unregister("provisioning")  # it finished on purpose
    assert watchdog.check()
    assert systemd.drain() == ["WATCHDOG=1\n", "WATCHDOG=1\n"]


async def test_a_watchdog_is_entered_once() -> None:
    watchdog = Watchdog(notifier=Notifier.from_env({}))
    async with watchdog:
        with pytest.raises(UsageError):
            await watchdog.__aenter__()


async def test_body_exception_propagates_and_task_stops(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env(systemd.env(watchdog_usec=100_000))
    seen: set[str] = set()

    async def body() -> None:
        async with Watchdog(notifier=notifier):
            seen.update(task.get_name() for task in asyncio.all_tasks())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await body()
    assert WATCHDOG_TASK_NAME in seen
    assert WATCHDOG_TASK_NAME not in {task.get_name() for task in asyncio.all_tasks()}


# --- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@ztp/notify", b"\0ztp/notify"),
    ],
)
def test_notify_address(value: str | None, expected: str | bytes | None) -> None:
    assert notify_address(value) == expected


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_notify_address_refuses(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        notify_address(value)
    assert info.value.key == "NOTIFY_SOCKET"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_timeout(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_timeout(env, pid=4242) == expected


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "1.5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "\u00b2"}, "WATCHDOG_USEC"),  # a digit to str.isdigit, not to int()
        ({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "x"}, "WATCHDOG_PID"),
    ],
)
def test_watchdog_timeout_refuses(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        watchdog_timeout(env, pid=1)
    assert info.value.key == key


@pytest.mark.parametrize(
    "fields",
    [{}, {"ready": "1"}, {"READY X": "1"}, {"STATUS": "a\nb"}, {"STATUS": "x" * 5000}],
)
def test_send_refuses_malformed_reports(systemd: FakeSystemd, fields: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        Notifier.from_env(systemd.env()).send(**fields)
    assert systemd.drain() == []


def test_send_custom_fields(systemd: FakeSystemd) -> None:
    assert Notifier.from_env(systemd.env()).send(EXTEND_TIMEOUT_USEC="5000000", STATUS="slow")
    assert systemd.drain() == ["EXTEND_TIMEOUT_USEC=5000000\nSTATUS=slow\n"]


def test_heartbeats() -> None:
    beats = Heartbeats()
    beats.register("a", within=1.0, now=0.0)
    beats.register("b", within=2.0, now=0.0)
    assert beats.names == ("a", "b")
    assert beats.stale(now=1.0) == {}
    assert beats.stale(now=1.5) == {"a": 1.5}
    beats.beat("a", now=1.5)
    beats.beat("a", now=1.0)  # an older time never moves a beat back
    assert beats.stale(now=2.25) == {"b": 2.25}
    beats.unregister("b")
    assert beats.stale(now=2.5) == {}, "exactly the allowance is still alive"
    assert beats.stale(now=2.6) == {"a": pytest.approx(1.1)}


@pytest.mark.parametrize(
    "misuse",
    [
        lambda b: b.register("", within=1.0, now=0.0),
        lambda b: b.register("a", within=1.0, now=0.0),
        lambda b: b.register("c", within=0.0, now=0.0),
        lambda b: b.beat("c", now=0.0),
        lambda b: b.unregister("c"),
    ],
)
def test_heartbeats_misuse(misuse: object) -> None:
    beats = Heartbeats()
    beats.register("a", within=1.0, now=0.0)
    with pytest.raises(UsageError):
        misuse(beats)  # type: ignore[operator]


def test_bad_intervals() -> None:
    with pytest.raises(UsageError):
        Notifier(address=None, watchdog_timeout=0.0)
    with pytest.raises(UsageError):
        Watchdog(notifier=Notifier(address=None), interval=-1.0)


# --- the device daemon itself, under a fake systemd -------------------------------------------


@pytest.fixture(scope="module")
def device_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceBroker]:
    pki = SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))
    broker = DeviceBroker(tmp_path_factory.mktemp("device-broker"), pki=pki)
    _run_private(broker.start())
    try:
        yield broker
    finally:
        _run_private(broker.stop())


def _run_private(coroutine: Coroutine[Any, Any, None]) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coroutine)
    finally:
        loop.close()


async def _gateway(broker: DeviceBroker) -> tuple[str, str]:
    serial = f"SN{uuid.uuid4().hex[:12].upper()}"
    password = f"pw-{uuid.uuid4().hex}"
    await broker.add_device(serial, password)
    return serial, password


def _config_text(broker: DeviceBroker, serial: str, state_dir: Path, *, first: float) -> str:
    return textwrap.dedent(
        f"""
        [device]
        serial = "{serial}"
        state_dir = "{state_dir}"
        [airvantage]
        host = "{broker.address.host}"
        port = {broker.address.port}
        tls = false
        backoff_base = 0.05
        backoff_cap = 0.2
        min_connect_interval = 0.05
        [retry]
        first = {first}
        cap = {first * 4}
        [publisher]
        enabled = false
        [log]
        destination = "stderr"
        """
    )


def _fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines())


async def test_daemon_process_reports_ready_status_watchdog_then_stopping(
    systemd: FakeSystemd, device_broker: DeviceBroker, tmp_path: Path
) -> None:
    serial, password = await _gateway(device_broker)
    config = tmp_path / "ztp.toml"
    config.write_text(_config_text(device_broker, serial, tmp_path / "state", first=60.0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZTP_", "WATCHDOG_"))}
    # The daemon logs to "syslog" too: a datagram socket of the test's, in place of /dev/log.
    syslog = _bound(str(systemd_dir(systemd) / "log"))
    env.update(
        systemd.env(),
        WATCHDOG_USEC="2000000",  # pings every second
        ZTP_AIRVANTAGE_PASSWORD=password,
        ZTP_LOG_DESTINATION="syslog",
        ZTP_LOG_SYSLOG_ADDRESS=syslog.getsockname(),
    )
    stderr = tmp_path / "stderr.log"
    datagrams: list[bytes] = []

    async def read_syslog() -> None:
        # Read as syslogd does: a reader that stops would block the daemon's logging.
        while True:
            datagrams.append(await asyncio.get_running_loop().sock_recv(syslog, 65536))

    reader = asyncio.create_task(read_syslog(), name="test.syslog")
    with stderr.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ztp_daemon", "run", "--config", str(config),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
        try:
            messages: list[dict[str, str]] = []
            async with asyncio.timeout(30):
                while sum("WATCHDOG" in m for m in messages) < 2 or not any(
                    "request_sent" in m.get("STATUS", "") for m in messages
                ):
                    messages.append(_fields(await systemd.receive()))
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                while "STOPPING" not in messages[-1]:
                    messages.append(_fields(await systemd.receive()))
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            datagrams += _drain_socket(syslog)
            syslog.close()
    assert code == 0, stderr.read_text()
    kinds = [next(iter(m)) for m in messages]  # READY, STATUS, WATCHDOG or STOPPING first
    ready = kinds.index("READY")
    assert messages[ready]["STATUS"].startswith("provisioning: ")
    assert "WATCHDOG" not in kinds[:ready], "READY=1 comes before the first WATCHDOG=1"
    assert kinds[ready + 1 :].count("WATCHDOG") >= 2
    statuses = [m["STATUS"] for m in messages if "STATUS" in m]
    assert statuses[0] == "provisioning: making_key"
    assert any("request_sent" in s for s in statuses), statuses
    assert messages[-1] == {"STOPPING": "1"}
    assert password not in stderr.read_text()
    # journalctl -t ztp and logread | grep ztp: every line is tagged ztp[<pid>], facility daemon.
    lines = [datagram.decode() for datagram in datagrams]
    assert lines, "nothing reached syslog"
    tag = re.compile(rf"<(\d+)>ztp\[{process.pid}\]: ")
    for line in lines:
        found = tag.match(line)
        assert found is not None, line
        assert int(found.group(1)) // 8 == 3, "LOG_DAEMON"
        assert password not in line
    assert any("event=provisioning.state" in line for line in lines)


def systemd_dir(systemd: FakeSystemd) -> Path:
    return Path(systemd.env_value).parent


def _drain_socket(sock: socket.socket) -> list[bytes]:
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(65536))
        except BlockingIOError:
            return datagrams


class _WedgingStateFile(StateFile):
    """A state file whose save hangs when the request is sent again: a stuck disk write."""

    def __init__(self, directory: Path, release: threading.Event) -> None:
        super().__init__(directory)
        self.release = release
        self.wedged = threading.Event()

    def save(self, record: StateRecord) -> None:
        if record.state is State.REQUEST_SENT and record.attempts >= 2:
            self.wedged.set()
            self.release.wait(timeout=30)
        super().save(record)


async def test_daemon_withholds_pings_while_its_machine_loop_is_wedged(
    systemd: FakeSystemd, device_broker: DeviceBroker, tmp_path: Path
) -> None:
    serial, password = await _gateway(device_broker)
    config_file = tmp_path / "ztp.toml"
    config_file.write_text(_config_text(device_broker, serial, tmp_path / "state", first=1.0))
    config = load_device_config(config_file, {"ZTP_AIRVANTAGE_PASSWORD": password})
    release = threading.Event()
    state_file = _WedgingStateFile(config.device.state_dir, release)
    notifier = Notifier.from_env(systemd.env(watchdog_usec=400_000))  # pings every 0.2 s
    supervisor = Supervisor(
        machine=ProvisioningMachine(
            MachineConfig(serial=serial, delivery_timeout=1.0, retry_cap=4.0),
            decoder=SharedCodecDecoder(),
            rng=random.Random(7),
            record=None,
        ),
        serial=serial,
        subject=config.csr_subject(serial),
        keystore=FileKeyStore(config.device.state_dir, key_type=config.device.key_type),
        state_file=state_file,
        bundles=BundleStore(config.device.state_dir / BUNDLE_DIRECTORY),
        link_settings=link_settings(config, serial),
        notifier=notifier,
    )
    stop = asyncio.Event()
    with capture_logs() as events:
        async with asyncio.TaskGroup() as group:
            group.create_task(supervisor.run(shutdown=stop.wait), name="test.daemon")
            try:
                async with asyncio.timeout(20):
                    while "READY" not in _fields(await systemd.receive()):
                        pass
                    pings = 0
                    while pings < 2:  # alive: the machine loop beats while it waits
                        pings += _fields(await systemd.receive()).get("WATCHDOG") == "1"
                    # No delivery: after 1 s the machine sends again and hangs saving that.
                    await asyncio.to_thread(state_file.wedged.wait, 20)
                # One ping may be due within the loop's allowance (one interval); then none,
                # while the event loop itself runs on (this test's awaits keep working).
                await asyncio.sleep(0.5)
                systemd.drain()
                await asyncio.sleep(1.0)
                assert [m for m in systemd.drain() if "WATCHDOG" in m] == []
            finally:
                release.set()
                stop.set()
    withheld = [e for e in events if e["event"].startswith("watchdog pings withheld")]
    assert len(withheld) == 1
    assert withheld[0]["loops"] == ["machine"]
