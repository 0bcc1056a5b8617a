"""The sandbox's two MQTT brokers: mosquitto 2.0 child processes on loopback ports.

Theory of operation
-------------------
Each broker is one ``mosquitto -c <generated config>`` child process, owned by an async context
manager. Everything mosquitto needs (configuration, password file, ACL, log, pid file) lives in
the broker's directory under the broker's name, so both brokers may share one directory.

- :class:`DeviceBroker` plays the AirVantage device broker: MQTT 3.1.1, plain or TLS, one
  username/password per device (the serial), ``pattern readwrite %u/#`` so a device reaches only
  ``{serial}/...``, and a privileged account (``admin_username``) that reaches every topic, for
  the AirVantage emulator.
- :class:`IotBroker` plays the AWS IoT Core data endpoint: mutual TLS only, the certificate's
  CN becomes the username (the thing name), a CRL from :class:`~sandbox.pki.SandboxPki`, and an
  ACL mirroring the per-thing least-privilege policy (see :data:`IOT_THING_TOPIC_PATTERNS`),
  plus an observer identity that may read everything.

Start-up: a free port is found by binding port 0, then mosquitto is started on it; the broker is
ready when an MQTT CONNECT (as the admin, or as the observer) gets a CONNACK with return code 0,
which proves the listener is ours and the credentials files were read. If mosquitto exits first,
:class:`~sandbox.errors.BrokerStartError` carries the tail of its output; a port taken in the
meantime by someone else is retried with a new one.

Reloads: the password file, the ACL and the CRL are rewritten, then mosquitto gets SIGHUP. A
reload counts as done when mosquitto's log shows ``Reloading config.`` after the signal *and* a
fresh CONNECT then succeeds: mosquitto is single-threaded and reloads inside one turn of its main
loop, so a connection it accepts after logging the reload is served with the new files. mosquitto
clears its reload flag when a reload ends, so a SIGHUP that arrives during another reload is lost;
one with no ``Reloading config.`` after it within a quarter second is sent again.

Processes: children are ``subprocess.Popen`` objects, and their exit is awaited through a pidfd
registered on whichever loop is running. A broker object is therefore not tied to the event loop
that started it (tests may start a broker once per session and use it from per-test loops). Stop
sends SIGTERM, then SIGKILL after a bound, and always reaps the child; if a start or a stop is
cancelled, the child is killed and reaped synchronously before the cancellation propagates, and
an ``atexit`` hook kills any child still alive when the interpreter exits.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandbox.errors import BrokerReloadError, BrokerStartError, SandboxUsageError
from sandbox.pki import SandboxPki, write_atomic
from ztp_daemon.mqtt_wire import utf8_string, variable_byte_integer

__all__ = [
    "DEFAULT_ADMIN_USERNAME",
    "IOT_THING_TOPIC_PATTERNS",
    "OBSERVER_COMMON_NAME",
    "BrokerAddress",
    "ClientCertificate",
    "DeviceBroker",
    "IotBroker",
    "client_tls_context",
    "mosquitto_password_hash",
    "write_client_certificate",
]

LOOPBACK = "127.0.0.1"
DEFAULT_ADMIN_USERNAME = "ztp-sandbox-admin"
OBSERVER_COMMON_NAME = "ztp-sandbox-observer"

#: The IoT broker's per-thing ACL, mosquitto ``pattern`` lines where ``%u`` is the certificate's
#: CN (the thing name). It mirrors the least-privilege policy the cloud daemon attaches
#: (``${iot:Connection.Thing.ThingName}``): telemetry under ``dt/{thing}/...``, commands under
#: ``cmd/{thing}/...``, and the thing's own reserved topics (shadow, jobs) under
#: ``$aws/things/{thing}/...``. Anything else is silently dropped (publish) or never delivered
#: (subscribe), as mosquitto does with every ACL refusal.
IOT_THING_TOPIC_PATTERNS = ("dt/%u/#", "cmd/%u/#", "$aws/things/%u/#")

# A serial (or thing name) becomes an MQTT username, a topic level and a line of the password
# file: no '/', '+', '#' (topic syntax), no ':' (password file separator), no whitespace.
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Thing names may hold ':' (AWS allows it); they never reach a password file.
_THING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,127}")
_MAX_PASSWORD = 255  # AirVantage's limit for a system's MQTT password

_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes for "$7$"
_PBKDF2_SALT_BYTES = 12

_RELOAD_MARK = b"Reloading config."
_RUNNING = re.compile(rb"mosquitto version \S+ running")
_ADDRESS_IN_USE = b"Address already in use"
_PORT_ATTEMPTS = 5
_PROBE_TIMEOUT = 2.0
# mosquitto acts on a SIGHUP within one turn of its loop (a nudge makes that immediate): a reload
# not in the log by then was lost and is asked for again.
_RESIGNAL_AFTER = 0.25
_LOG_TAIL_LINES = 25

_live_children: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftover_children() -> None:
    """Last line of defence: never leave a mosquitto behind when the interpreter exits."""
    for child in list(_live_children):
        _kill_and_reap(child)


def _kill_and_reap(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap synchronously: bounded, since the kernel reaps a killed child at once."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait()
    _live_children.discard(child)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where a client reaches a sandbox broker.

    Attributes:
        host: always the loopback address the broker listens on.
        port: the TCP port.
        ca_file: the CA certificate to trust for TLS, or None for a plain listener.
    """

    host: str
    port: int
    ca_file: Path | None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            msg = f"port must be in 1..65535, got {self.port}"
            raise SandboxUsageError(msg)
        if not self.host:
            msg = "host must not be empty"
            raise SandboxUsageError(msg)

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS."""
        return self.ca_file is not None


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A client certificate signed by the sandbox CA, with its key, both on disk.

    Attributes:
        common_name: the subject CN (a thing name, or the observer's name).
        cert_file: the certificate in PEM.
        key_file: the private key in PEM (0600).
        serial: the certificate's serial number, what a CRL lists.
    """

    common_name: str
    cert_file: Path
    key_file: Path
    serial: int


def write_client_certificate(
    pki: SandboxPki,
    common_name: str,
    directory: Path,
    *,
    stem: str | None = None,
) -> ClientCertificate:
    """Make a fresh EC P-256 key and a client certificate for ``common_name``, on disk.

    Args:
        pki: the sandbox CA that signs the certificate.
        common_name: the subject CN; on the IoT broker it becomes the username (thing name).
        directory: where to write ``{stem}.pem`` and ``{stem}.key`` (the key 0600, atomically).
        stem: the file name stem; defaults to ``common_name``.

    Returns:
        The certificate's files, CN and serial number.

    Raises:
        SandboxUsageError: ``common_name`` or ``stem`` cannot be a thing name or a file name.
    """
    name = stem if stem is not None else common_name
    if not _THING_NAME.fullmatch(common_name) or not _THING_NAME.fullmatch(name):
        msg = f"not a usable common name or file stem: {common_name!r} / {name!r}"
        raise SandboxUsageError(msg)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign(
        key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(key_file, key_pem, 0o600)
    write_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ClientCertificate(common_name, cert_file, key_file, cert.serial_number)


def client_tls_context(
    address: BrokerAddress,
    certificate: ClientCertificate | None = None,
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """Build a client TLS context that trusts the broker's CA, optionally with a client certificate.

    Args:
        address: the broker's address; its ``ca_file`` is trusted.
        certificate: the client certificate to present (mutual TLS), or None.
        maximum_version: cap the TLS version (``TLSv1_2`` makes a refused client certificate
            fail the handshake itself, instead of a later disconnect under TLS 1.3).

    Returns:
        A context verifying the broker's certificate and host name.

    Raises:
        SandboxUsageError: the address is a plain listener.
    """
    if address.ca_file is None:
        msg = f"broker at port {address.port} is not a TLS listener"
        raise SandboxUsageError(msg)
    context = ssl.create_default_context(cafile=str(address.ca_file))
    if maximum_version is not None:
        context.maximum_version = maximum_version
    if certificate is not None:
        context.load_cert_chain(str(certificate.cert_file), str(certificate.key_file))
    return context


def mosquitto_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """Hash a password the way ``mosquitto_passwd`` 2.0 does (``$7$``: PBKDF2-SHA512).

    Args:
        password: the clear password.
        salt: 12 bytes of salt; random when None (tests pass one to compare with mosquitto_passwd).

    Returns:
        ``$7$101$<salt base64>$<hash base64>``, the field after ``username:`` in a password file.
    """
    salt = salt if salt is not None else secrets.token_bytes(_PBKDF2_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return (
        f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
        f"${base64.b64encode(digest).decode()}"
    )


def _free_port() -> int:
    """A port the kernel considers free right now (the broker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def _find_mosquitto() -> Path | None:
    # Debian puts the broker in /usr/sbin, which an unprivileged PATH often lacks.
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


async def _mqtt_connect_probe(
    address: BrokerAddress,
    *,
    tls: ssl.SSLContext | None,
    username: str | None,
    password: str | None,
) -> int:
    """Send one MQTT 3.1.1 CONNECT and return the CONNACK return code (0 = accepted).

    A raw CONNECT rather than an MQTT client: it needs no client loop or thread, so it works from
    any event loop, and it reports the broker's exact return code.

    Raises:
        OSError: the connection or the TLS handshake failed (``ssl.SSLError`` included).
        TimeoutError: no CONNACK within the bound.
        asyncio.IncompleteReadError: the broker closed the connection instead of answering.
    """
    flags = 0x02  # clean session: the probe leaves nothing behind in the broker
    payload = utf8_string(f"ztp-sandbox-probe-{secrets.token_hex(6)}")
    if username is not None:
        flags |= 0x80
        payload += utf8_string(username)
    if password is not None:
        flags |= 0x40
        payload += utf8_string(password)
    body = utf8_string("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + payload
    async with asyncio.timeout(_PROBE_TIMEOUT):
        reader, writer = await asyncio.open_connection(address.host, address.port, ssl=tls)
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            writer.write(b"\x10" + variable_byte_integer(len(body)) + body)
            await writer.drain()
            connack = await reader.readexactly(4)
            if connack[:2] != b"\x20\x02":
                msg = f"not a CONNACK: {connack.hex()}"
                raise ConnectionError(msg)
            writer.write(b"\xe0\x00")  # DISCONNECT, so mosquitto logs a clean close
            await writer.drain()
            return connack[3]
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


async def _wait_exit(child: subprocess.Popen[bytes]) -> None:
    """Wait for ``child`` to exit, and reap it (the caller bounds the wait)."""
    if child.poll() is not None:
        return
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:
        # No pidfd (an old kernel, a seccomp filter): poll instead.
        delay = 0.005
        while child.poll() is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    child.wait()  # the child has exited: this only reaps it


def _tail(paths: Iterable[Path], lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of each existing file, for error messages."""
    parts = []
    for path in paths:
        try:
            with path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 8192))
                text = handle.read().decode(errors="replace")
        except FileNotFoundError:
            continue
        kept = text.splitlines()[-lines:]
        if kept:
            parts.append(f"[{path.name}]\n" + "\n".join(kept))
    return "\n".join(parts)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    """What ``path`` holds past ``offset`` (empty if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read()
    except FileNotFoundError:
        return b""


def log_size(path: Path) -> int:
    """How many bytes a broker's log holds now: the offset to pass to :func:`log_shows_reload`."""
    return _size(path)


def log_shows_reload(log_file: Path, offset: int) -> bool:
    """Whether mosquitto logged the start of a reload in ``log_file`` past ``offset``.

    mosquitto logs ``Reloading config.`` before it rereads any file, so a mark past an offset
    taken after the files were rewritten proves the new files are the ones being read.
    """
    return _RELOAD_MARK in _read_from(log_file, offset)


def _no_whitespace(path: Path) -> Path:
    # mosquitto splits configuration values on spaces: a path with one cannot be configured.
    if any(char.isspace() for char in str(path)):
        msg = f"mosquitto cannot use a path containing whitespace: {str(path)!r}"
        raise SandboxUsageError(msg)
    return path


class _Mosquitto(abc.ABC):
    """What both brokers share: files, the child process, readiness, reload, stop."""

    name = "mosquitto"

    def __init__(
        self,
        directory: Path,
        *,
        pki: SandboxPki,
        port: int = 0,
        executable: Path | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        reload_timeout: float = 15.0,
    ) -> None:
        if not 0 <= port < 65536:
            msg = f"port must be 0 (pick a free one) or in 1..65535, got {port}"
            raise SandboxUsageError(msg)
        self._directory = _no_whitespace(directory.absolute())
        self._pki = pki
        self._port = port
        self._auto_port = port == 0
        self._executable = executable
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._reload_timeout = reload_timeout
        self._child: subprocess.Popen[bytes] | None = None
        # Serialises start, stop and reloads; see _guard() for why it may be replaced.
        self._lock = asyncio.Lock()
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._log = structlog.get_logger().bind(broker=self.name)

    def _guard(self) -> asyncio.Lock:
        # An asyncio.Lock binds to the first loop that waits on it. A broker outlives loops
        # (a session fixture started on one, tests on others), so an idle lock is renewed when
        # the running loop changes; a held one is kept, and contending for it from another loop
        # is then the caller's error that asyncio reports.
        loop = asyncio.get_running_loop()
        if loop is not self._lock_loop and not self._lock.locked():
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    # -- files ---------------------------------------------------------------------------------

    def _file(self, suffix: str) -> Path:
        return self._directory / f"{self.name}.{suffix}"

    @property
    def directory(self) -> Path:
        """Where the broker's files live."""
        return self._directory

    @property
    def config_file(self) -> Path:
        """The generated mosquitto configuration."""
        return self._file("conf")

    @property
    def log_file(self) -> Path:
        """mosquitto's log (appended across restarts)."""
        return self._file("log")

    @property
    def pid_file(self) -> Path:
        """mosquitto's pid file, present only while the broker runs.

        Another process (the moto fidelity layer) may SIGHUP that pid after rewriting the CRL.
        mosquitto acts on the signal at its next event-loop turn, within about 100 ms, or at once
        if a connection arrives; :meth:`reload` does both and waits for the confirmation.
        """
        return self._file("pid")

    @property
    def _output_file(self) -> Path:
        # mosquitto prints start-up errors (bad config, unreadable files) on stderr, not its log.
        return self._file("out")

    # -- state ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the mosquitto child is alive."""
        return self._child is not None and self._child.poll() is None

    @property
    def pid(self) -> int | None:
        """The mosquitto child's pid while it is running, else None."""
        return self._child.pid if self.running and self._child is not None else None

    @property
    def port(self) -> int:
        """The listening port (0 until the first start picks one)."""
        return self._port

    @property
    def address(self) -> BrokerAddress:
        """Where clients connect.

        Raises:
            SandboxUsageError: no port has been chosen yet (never started, ``port=0``).
        """
        if self._port == 0:
            msg = f"{self.name} has no port yet: start it first"
            raise SandboxUsageError(msg)
        return BrokerAddress(LOOPBACK, self._port, self._ca_file())

    # -- what each broker defines ----------------------------------------------------------------

    @abc.abstractmethod
    def _ca_file(self) -> Path | None:
        """See the subclasses."""

    @abc.abstractmethod
    def _listener_lines(self) -> list[str]:
        """See the subclasses."""

    @abc.abstractmethod
    def _write_auth_files(self) -> None:
        """See the subclasses."""

    @abc.abstractmethod
    def _probe_tls(self) -> ssl.SSLContext | None:
        """See the subclasses."""

    @abc.abstractmethod
    def _probe_credentials(self) -> tuple[str | None, str | None]:
        """See the subclasses."""

    # -- life cycle ----------------------------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            f"# Generated by the ztp sandbox ({self.name}); rewritten on every start.",
            *(["user root"] if os.geteuid() == 0 else []),
            "persistence false",
            f"pid_file {self.pid_file}",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
            # Without it, a client's delayed ACK stalls every publish-then-wait batch ~45 ms.
            "set_tcp_nodelay true",
            f"listener {self._port} {LOOPBACK}",
            *self._listener_lines(),
        ]
        write_atomic(self.config_file, ("\n".join(lines) + "\n").encode(), 0o600)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start mosquitto and wait until it serves MQTT on its port.

        A broker made with ``port=0`` picks a free port on its first start and keeps it.

        Raises:
            SandboxUsageError: already running, or mosquitto is not installed.
            BrokerStartError: mosquitto exited or did not answer within ``start_timeout``.
        """
        async with self._guard():
            if self.running:
                msg = f"{self.name} is already running"
                raise SandboxUsageError(msg)
            executable = self._executable or _find_mosquitto()
            if executable is None:
                msg = "mosquitto is not installed (apt-get install mosquitto)"
                raise SandboxUsageError(msg)
            self._directory.mkdir(parents=True, exist_ok=True)
            self._write_auth_files()
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                if self._port == 0 or (self._auto_port and attempt > 1):
                    self._port = _free_port()
                try:
                    await self._start_once(executable)
                except _PortTakenError:
                    if not self._auto_port or attempt == _PORT_ATTEMPTS:
                        raise BrokerStartError(
                            self.name,
                            f"port {self._port} is already in use",
                            log_tail=_tail((self.log_file, self._output_file)),
                        ) from None
                    self._log.info("broker.port_taken", port=self._port, attempt=attempt)
                else:
                    return

    async def _start_once(self, executable: Path) -> None:
        self._write_config()
        self.pid_file.unlink(missing_ok=True)
        log_offset, out_offset = _size(self.log_file), _size(self._output_file)
        began = time.monotonic()
        with self._output_file.open("ab") as output:
            # Popen, not asyncio's subprocess: an asyncio child is bound to the loop that made
            # it, and a broker must outlive that loop (session fixtures, the demo). fork+exec
            # takes about a millisecond.
            child = subprocess.Popen(  # noqa: ASYNC220
                [str(executable), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        _live_children.add(child)
        self._child = child
        try:
            await self._wait_ready(child, log_offset, out_offset)
        except BaseException:
            # Failed or cancelled: the child must not outlive this call.
            _kill_and_reap(child)
            self._child = None
            raise
        self._log.info(
            "broker.started",
            port=self._port,
            pid=child.pid,
            tls=self._ca_file() is not None,
            elapsed_ms=round((time.monotonic() - began) * 1000, 1),
        )

    def _new_output(self, log_offset: int, out_offset: int) -> bytes:
        return b"\n".join(
            (_read_from(self.log_file, log_offset), _read_from(self._output_file, out_offset))
        )

    async def _wait_ready(
        self, child: subprocess.Popen[bytes], log_offset: int, out_offset: int
    ) -> None:
        # Probe only once mosquitto says its listeners are open: before that, a connection to
        # the port could reach whoever else holds it.
        address = self.address
        tls = self._probe_tls()
        username, password = self._probe_credentials()
        delay = 0.002
        try:
            async with asyncio.timeout(self._start_timeout):
                while True:
                    output = self._new_output(log_offset, out_offset)
                    if child.poll() is not None:
                        if _ADDRESS_IN_USE in output:
                            raise _PortTakenError
                        raise BrokerStartError(
                            self.name,
                            f"mosquitto exited with status {child.returncode} during start-up",
                            log_tail=_tail((self.log_file, self._output_file)),
                        )
                    if _RUNNING.search(output):
                        try:
                            code = await _mqtt_connect_probe(
                                address, tls=tls, username=username, password=password
                            )
                        except (OSError, EOFError, TimeoutError):
                            pass  # listening, not answering yet: look again
                        else:
                            if code != 0:
                                raise BrokerStartError(
                                    self.name,
                                    f"mosquitto refused the readiness probe (CONNACK {code})",
                                    log_tail=_tail((self.log_file, self._output_file)),
                                )
                            return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
        except TimeoutError:
            raise BrokerStartError(
                self.name,
                f"no MQTT answer on port {self._port} within {self._start_timeout} s",
                log_tail=_tail((self.log_file, self._output_file)),
            ) from None

    async def stop(self) -> None:
        """Stop mosquitto: SIGTERM, then SIGKILL after ``stop_timeout``; always reap the child.

        Safe to call when not running. If cancelled, the child is killed and reaped before the
        cancellation propagates.
        """
        try:
            async with self._guard():
                await self._stop_locked()
        except BaseException:
            # Cancelled while waiting for the lock (or while stopping): kill now, not later.
            child, self._child = self._child, None
            if child is not None:
                _kill_and_reap(child)
                self._remove_stale_pid_file(child.pid)
            raise

    async def _stop_locked(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            if child.poll() is None:
                child.terminate()
                try:
                    async with asyncio.timeout(self._stop_timeout):
                        await self._nudge()
                        await _wait_exit(child)
                except TimeoutError:
                    self._log.warning("broker.kill", pid=child.pid, after_s=self._stop_timeout)
        finally:
            _kill_and_reap(child)
            self._remove_stale_pid_file(child.pid)
        self._log.info("broker.stopped", port=self._port, pid=child.pid, status=child.returncode)

    def _remove_stale_pid_file(self, pid: int) -> None:
        # After a SIGKILL mosquitto leaves its pid file; a stale one would let another process
        # signal whatever process reuses that pid.
        with contextlib.suppress(FileNotFoundError, ValueError):
            if int(self.pid_file.read_text().strip()) == pid:
                self.pid_file.unlink()

    async def _nudge(self) -> None:
        """Open and drop a TCP connection, so mosquitto acts on a signal at once.

        mosquitto only looks at its signal flags between two turns of its event loop, which
        otherwise waits up to 100 ms for network activity: a reload or a stop took that long.
        """
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(LOOPBACK, self._port)
            writer.close()
            await writer.wait_closed()

    async def restart(self) -> None:
        """Stop and start again on the same port (clients see an outage, then reconnect).

        Raises:
            BrokerStartError: the broker did not come back.
        """
        await self.stop()
        await self.start()

    async def reload(self) -> None:
        """Re-read the password file, ACL and CRL (SIGHUP); effective when this returns.

        Does nothing if the broker is not running (the files are read at the next start).

        Raises:
            BrokerReloadError: mosquitto did not log the reload, or did not serve a connection
                after it, within ``reload_timeout``.
        """
        async with self._guard():
            await self._reload_locked()

    async def _reload_locked(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        offset = _size(self.log_file)
        began = time.monotonic()
        delay = 0.002
        try:
            async with asyncio.timeout(self._reload_timeout):
                signalled = time.monotonic()
                child.send_signal(signal.SIGHUP)
                await self._nudge()
                while not log_shows_reload(self.log_file, offset):
                    if child.poll() is not None:
                        raise BrokerReloadError(
                            self.name,
                            f"mosquitto exited with status {child.returncode} on reload",
                            log_tail=_tail((self.log_file, self._output_file)),
                        )
                    if time.monotonic() - signalled >= _RESIGNAL_AFTER:
                        # mosquitto clears its reload flag only when a reload ends, so a SIGHUP
                        # that lands during one (another process, the moto fidelity layer, also
                        # signals this broker) is lost: send it again.
                        signalled = time.monotonic()
                        child.send_signal(signal.SIGHUP)
                        await self._nudge()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
                username, password = self._probe_credentials()
                code = await _mqtt_connect_probe(
                    self.address, tls=self._probe_tls(), username=username, password=password
                )
        except (OSError, EOFError, TimeoutError) as exc:
            raise BrokerReloadError(
                self.name,
                f"reload not confirmed within {self._reload_timeout} s ({type(exc).__name__})",
                log_tail=_tail((self.log_file, self._output_file)),
            ) from exc
        if code != 0:
            raise BrokerReloadError(
                self.name,
                f"after reload the broker refused its probe (CONNACK code {code})",
                log_tail=_tail((self.log_file, self._output_file)),
            )
        self._log.info("broker.reloaded", elapsed_ms=round((time.monotonic() - began) * 1000, 1))


class _PortTakenError(Exception):
    """mosquitto could not bind its port: someone took it after we found it free."""


class DeviceBroker(_Mosquitto):
    """The AirVantage device broker: per-device passwords, ``{serial}/...`` topics only.

    Args:
        directory: where the configuration, password file, ACL, log and pid file are written.
        pki: the sandbox PKI (its CA and ``device-broker`` server certificate are used for TLS).
        port: the port to listen on; 0 picks a free one at the first start.
        tls: serve TLS (server certificate from the sandbox CA) instead of plain MQTT.
        admin_username: the privileged account of the AirVantage emulator (every topic).
        executable: the mosquitto binary; found on PATH (and /usr/sbin) when None.
        start_timeout: bound on start-up, seconds.
        stop_timeout: how long SIGTERM is given before SIGKILL, seconds.
        reload_timeout: bound on a confirmed reload, seconds.
    """

    name = "device-broker"

    def __init__(
        self,
        directory: Path,
        *,
        pki: SandboxPki,
        port: int = 0,
        tls: bool = False,
        admin_username: str = DEFAULT_ADMIN_USERNAME,
        executable: Path | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        reload_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            directory,
            pki=pki,
            port=port,
            executable=executable,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            reload_timeout=reload_timeout,
        )
        _check_identity(admin_username)
        self._tls = tls
        self._admin_username = admin_username
        self._admin_password = secrets.token_urlsafe(24)
        # Hashes only: the clear device passwords are never kept.
        self._hashes: dict[str, str] = {}
        self._probe_context: ssl.SSLContext | None = None

    @property
    def admin_username(self) -> str:
        """The privileged account's username (reads and writes every topic)."""
        return self._admin_username

    @property
    def admin_password(self) -> str:
        """The privileged account's password (random per broker object). Never log it."""
        return self._admin_password

    @property
    def password_file(self) -> Path:
        """The mosquitto password file (``$7$`` hashes, 0600)."""
        return self._file("passwd")

    @property
    def acl_file(self) -> Path:
        """The mosquitto ACL file."""
        return self._file("acl")

    @property
    def devices(self) -> frozenset[str]:
        """The serials that currently have an account."""
        return frozenset(self._hashes)

    def _ca_file(self) -> Path | None:
        return self._pki.ca_file if self._tls else None

    def _listener_lines(self) -> list[str]:
        lines = [
            "allow_anonymous false",
            f"password_file {_no_whitespace(self.password_file)}",
            f"acl_file {_no_whitespace(self.acl_file)}",
        ]
        if self._tls:
            cert, key = self._pki.server_certificate(self.name)
            lines += [
                f"cafile {_no_whitespace(self._pki.ca_file)}",
                f"certfile {_no_whitespace(cert)}",
                f"keyfile {_no_whitespace(key)}",
            ]
        return lines

    def _write_auth_files(self) -> None:
        acl = [
            "# Every device reads and writes under its own serial only.",
            "pattern readwrite %u/#",
            "",
            "# The AirVantage emulator's privileged account.",
            f"user {self._admin_username}",
            "topic readwrite #",
        ]
        write_atomic(self.acl_file, ("\n".join(acl) + "\n").encode(), 0o644)
        entries = {
            **self._hashes,
            self._admin_username: mosquitto_password_hash(self._admin_password),
        }
        text = "".join(f"{user}:{hashed}\n" for user, hashed in entries.items())
        write_atomic(self.password_file, text.encode(), 0o600)

    def _probe_tls(self) -> ssl.SSLContext | None:
        if not self._tls:
            return None
        if self._probe_context is None:
            self._probe_context = client_tls_context(self.address)
        return self._probe_context

    def _probe_credentials(self) -> tuple[str | None, str | None]:
        return self._admin_username, self._admin_password

    async def add_device(self, serial: str, password: str) -> None:
        """Give a device an account (or a new password); effective when this returns.

        Args:
            serial: the device's serial: its MQTT username and its topic prefix.
            password: its MQTT password (1..255 characters).

        Raises:
            SandboxUsageError: the serial or password is not acceptable.
            BrokerReloadError: mosquitto did not confirm the reload.
        """
        await self.add_devices({serial: password})

    async def add_devices(self, credentials: Mapping[str, str]) -> None:
        """Give many devices accounts with one rewrite and one reload; effective on return.

        The reload is confirmed by mosquitto's log, then by connecting as one of the devices.

        Args:
            credentials: serial → password.

        Raises:
            SandboxUsageError: a serial or password is not acceptable (nothing is changed).
            BrokerReloadError: mosquitto did not confirm the reload.
        """
        hashed = {}
        for serial, password in credentials.items():
            _check_identity(serial)
            if serial == self._admin_username:
                msg = f"serial {serial!r} is the admin account's username"
                raise SandboxUsageError(msg)
            if not 0 < len(password) <= _MAX_PASSWORD or "\x00" in password:
                msg = f"password for {serial!r}: 1..{_MAX_PASSWORD} characters, no NUL"
                raise SandboxUsageError(msg)
            hashed[serial] = mosquitto_password_hash(password)
        if not hashed:
            return
        async with self._guard():
            self._hashes.update(hashed)
            self._write_auth_files()
            if not self.running:
                return
            await self._reload_locked()
            serial, password = list(credentials.items())[-1]
            try:
                code = await _mqtt_connect_probe(
                    self.address, tls=self._probe_tls(), username=serial, password=password
                )
            except (OSError, EOFError, TimeoutError) as exc:
                raise BrokerReloadError(self.name, f"cannot connect as {serial!r}") from exc
            if code != 0:
                raise BrokerReloadError(
                    self.name,
                    f"device {serial!r} refused after reload (CONNACK code {code})",
                    log_tail=_tail((self.log_file,)),
                )
        self._log.info("broker.devices_added", count=len(hashed))

    async def remove_device(self, serial: str) -> None:
        """Delete a device's account; effective (new connections refused) when this returns.

        Existing connections stay up, as they do when mosquitto reloads.

        Raises:
            BrokerReloadError: mosquitto did not confirm the reload.
        """
        async with self._guard():
            if self._hashes.pop(serial, None) is None:
                return
            self._write_auth_files()
            await self._reload_locked()
        self._log.info("broker.device_removed", serial=serial)


class IotBroker(_Mosquitto):
    """The AWS IoT Core data endpoint: mutual TLS, CN = thing name, per-thing topics, a CRL.

    Args:
        directory: where the configuration, ACL, observer certificate, log and pid file go.
        pki: the sandbox PKI: its CA verifies clients, its CRL is loaded, and it issues the
            ``iot-broker`` server certificate and the observer's certificate.
        port: the port to listen on; 0 picks a free one at the first start.
        executable: the mosquitto binary; found on PATH (and /usr/sbin) when None.
        start_timeout: bound on start-up, seconds.
        stop_timeout: how long SIGTERM is given before SIGKILL, seconds.
        reload_timeout: bound on a confirmed reload, seconds.
    """

    name = "iot-broker"

    def __init__(
        self,
        directory: Path,
        *,
        pki: SandboxPki,
        port: int = 0,
        executable: Path | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        reload_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            directory,
            pki=pki,
            port=port,
            executable=executable,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            reload_timeout=reload_timeout,
        )
        self._observer: ClientCertificate | None = None
        self._probe_context: ssl.SSLContext | None = None

    @property
    def acl_file(self) -> Path:
        """The mosquitto ACL file."""
        return self._file("acl")

    @property
    def observer(self) -> ClientCertificate:
        """The observer's certificate (CN :data:`OBSERVER_COMMON_NAME`, reads every topic)."""
        if self._observer is None:
            self._observer = self._load_or_make_observer()
        return self._observer

    def observer_certificate(self) -> tuple[Path, Path]:
        """The observer's certificate and key files, made on first use.

        The observer may subscribe to ``#`` and ``$aws/#``, so tests and the demo can count what
        arrives; it may publish nowhere.

        Returns:
            ``(cert_path, key_path)``.
        """
        return self.observer.cert_file, self.observer.key_file

    def _load_or_make_observer(self) -> ClientCertificate:
        stem = f"{self.name}-observer"
        cert_file, key_file = self._directory / f"{stem}.pem", self._directory / f"{stem}.key"
        # Reuse the files of an earlier run only if this sandbox CA issued them.
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError, InvalidSignature):
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            if key_file.exists():
                cert.verify_directly_issued_by(self._pki.ca_cert)
                return ClientCertificate(
                    OBSERVER_COMMON_NAME, cert_file, key_file, cert.serial_number
                )
        return write_client_certificate(self._pki, OBSERVER_COMMON_NAME, self._directory, stem=stem)

    def _ca_file(self) -> Path | None:
        return self._pki.ca_file

    def _listener_lines(self) -> list[str]:
        cert, key = self._pki.server_certificate(self.name)
        return [
            f"cafile {_no_whitespace(self._pki.ca_file)}",
            f"certfile {_no_whitespace(cert)}",
            f"keyfile {_no_whitespace(key)}",
            f"crlfile {_no_whitespace(self._pki.crl_file)}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            f"acl_file {_no_whitespace(self.acl_file)}",
        ]

    def _write_auth_files(self) -> None:
        acl = [
            "# A thing reads and writes only its own topics (the per-thing policy).",
            *(f"pattern readwrite {pattern}" for pattern in IOT_THING_TOPIC_PATTERNS),
            "",
            "# The observer reads everything ('#' does not match '$' topics, hence two lines).",
            f"user {OBSERVER_COMMON_NAME}",
            "topic read #",
            "topic read $aws/#",
        ]
        write_atomic(self.acl_file, ("\n".join(acl) + "\n").encode(), 0o644)
        if not self._pki.crl_file.exists():
            self._pki.write_crl(())

    def _probe_tls(self) -> ssl.SSLContext:
        if self._probe_context is None:
            self._probe_context = client_tls_context(self.address, self.observer)
        return self._probe_context

    def _probe_credentials(self) -> tuple[str | None, str | None]:
        return None, None

    async def reload_crl(self, revoked_serials: Iterable[int]) -> None:
        """Rewrite the CRL with exactly ``revoked_serials`` and reload; effective on return.

        New TLS handshakes with a listed certificate fail from then on. Connections already up
        stay up (mosquitto checks the CRL at handshake only).

        Raises:
            BrokerReloadError: mosquitto did not confirm the reload.
        """
        serials = sorted(set(revoked_serials))
        async with self._guard():
            self._pki.write_crl(serials)
            await self._reload_locked()
        self._log.info("broker.crl_reloaded", revoked=len(serials))


def _check_identity(name: str) -> None:
    if not _IDENTITY.fullmatch(name):
        msg = f"not usable as an MQTT username and topic level: {name!r}"
        raise SandboxUsageError(msg)
