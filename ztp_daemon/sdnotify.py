"""The systemd notification protocol (``sd_notify``), spoken directly, and a loop-aware watchdog.

Theory of operation
-------------------
systemd tells a ``Type=notify`` service where to report in ``NOTIFY_SOCKET``: a filesystem path
(``/run/systemd/notify``) or, with a leading ``@``, a Linux abstract socket name. A report is one
datagram of ``KEY=VALUE`` lines: ``READY=1`` once start-up is done, ``STATUS=<one line>`` for
``systemctl status``, ``STOPPING=1`` when shutdown begins, ``WATCHDOG=1`` as a keep-alive. The
protocol is tiny and a dependency would earn nothing, so :class:`Notifier` speaks it itself. With
``NOTIFY_SOCKET`` unset (run by hand, in a test, under another init) every call is a no-op.

A report is sent without blocking (``MSG_DONTWAIT``) on a fresh socket, as libsystemd does; a
report that cannot be delivered is logged and dropped, never raised: a notification is advice to
the service manager, not part of the daemon's work.

``WatchdogSec=`` makes systemd set ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process expected to
ping); a service silent for that long is killed and, with ``Restart=on-failure``, restarted. A
ping from a timer alone would prove only that the event loop turns, so :class:`Watchdog` pings
only while every registered main loop has called :meth:`Watchdog.beat` recently: a loop stuck on
an await that never returns stops the pings, and systemd restarts the daemon. The decision of
which loops are stale is the pure :class:`Heartbeats`; the async :class:`Watchdog` owns the one
task that asks it and pings.

Usage, in the supervisor::

    notifier = Notifier.from_env(os.environ)
    async with Watchdog(notifier=notifier) as watchdog:
        watchdog.register("link")
        ...                      # the link loop calls watchdog.beat("link") at least every
                                 # watchdog.beat_period seconds, also while idle
        notifier.ready(status="waiting for certificate")
        ...
        notifier.stopping()
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import structlog

from shared.errors import ConfigError, UsageError

__all__ = [
    "WATCHDOG_TASK_NAME",
    "Heartbeats",
    "Notifier",
    "Watchdog",
    "notify_address",
    "watchdog_timeout",
]

WATCHDOG_TASK_NAME: Final = "sd-watchdog"
# systemd reads at most this much of a notification datagram (NOTIFY_BUFFER_MAX).
_MAX_DATAGRAM: Final = 4096
_MAX_STATUS: Final = 200
_DIGITS: Final = re.compile(r"[0-9]{1,19}")

_log = structlog.get_logger()


def notify_address(value: str | None) -> str | bytes | None:
    """Turn a ``NOTIFY_SOCKET`` value into a socket address.

    Args:
        value: the variable's value, or ``None`` when it is unset.

    Returns:
        ``None`` when notifications are off (unset or empty), a filesystem path, or the bytes of
        an abstract address (``@name`` becomes ``b"\\0name"``).

    Raises:
        ConfigError: the value is neither an absolute path nor ``@name`` (systemd's ``vsock:``
            addresses, used only inside virtual machines, are not supported).
    """
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ConfigError("NOTIFY_SOCKET", "expected an absolute path or an @abstract name")


def watchdog_timeout(env: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd asked for, in seconds, as ``sd_watchdog_enabled`` reads it.

    Args:
        env: the environment.
        pid: this process's id (``os.getpid()`` by default), compared with ``WATCHDOG_PID``.

    Returns:
        ``None`` when there is no watchdog for this process: ``WATCHDOG_USEC`` unset, or
        ``WATCHDOG_PID`` naming another process (a child that inherited the environment must
        not ping for its parent).

    Raises:
        ConfigError: ``WATCHDOG_USEC`` or ``WATCHDOG_PID`` is not a positive integer.
    """
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        if not _DIGITS.fullmatch(pid_text) or int(pid_text) <= 0:
            raise ConfigError("WATCHDOG_PID", "expected a positive integer")
        if int(pid_text) != (os.getpid() if pid is None else pid):
            return None
    if not _DIGITS.fullmatch(usec_text) or int(usec_text) <= 0:
        raise ConfigError("WATCHDOG_USEC", "expected a positive integer")
    return int(usec_text) / 1_000_000


def _status_line(text: str) -> str:
    """One printable line: systemd shows the status verbatim, and a newline would end the field."""
    line = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return line if len(line) <= _MAX_STATUS else f"{line[: _MAX_STATUS - 3]}..."


class Notifier:
    """Sends ``sd_notify`` reports; a no-op when there is nowhere to send them.

    Build it with :meth:`from_env`. Every method returns whether a datagram was sent, so a test
    or the supervisor can tell a delivered report from a disabled or failed one; a failed
    delivery is logged, never raised.
    """

    __slots__ = ("_address", "_failed", "_watchdog_timeout")

    def __init__(
        self, *, address: str | bytes | None, watchdog_timeout: float | None = None
    ) -> None:
        """Args:
        address: the socket address (see :func:`notify_address`), or ``None`` for a no-op.
        watchdog_timeout: the watchdog timeout in seconds, or ``None`` when there is none.

        Raises:
            UsageError: ``watchdog_timeout`` is not positive.
        """
        if watchdog_timeout is not None and not watchdog_timeout > 0:
            raise UsageError(f"watchdog_timeout must be > 0, got {watchdog_timeout!r}")
        self._address = address
        self._watchdog_timeout = watchdog_timeout
        # The errno of the last failure, so a dead socket is logged once, not on every ping.
        self._failed: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Args:
            env: the environment (``os.environ``).

        Returns:
            A notifier; a no-op one when ``NOTIFY_SOCKET`` is unset.

        Raises:
            ConfigError: one of the variables is malformed.
        """
        return cls(
            address=notify_address(env.get("NOTIFY_SOCKET")),
            watchdog_timeout=watchdog_timeout(env),
        )

    @property
    def enabled(self) -> bool:
        """Whether reports go anywhere."""
        return self._address is not None

    @property
    def watchdog_timeout(self) -> float | None:
        """The watchdog timeout in seconds (``WatchdogSec=``), or ``None`` without a watchdog."""
        return self._watchdog_timeout

    def send(self, **fields: str) -> bool:
        """Send one report of ``KEY=VALUE`` lines, keys as given (``READY="1"``).

        Args:
            **fields: the assignments; values must be single lines.

        Returns:
            ``True`` when the datagram was sent, ``False`` when notifications are off or the
            send failed (logged once until a send succeeds again).

        Raises:
            UsageError: no field, a key that is not upper-case ASCII, or a value with a newline.
        """
        if not fields:
            raise UsageError("an sd_notify report needs at least one field")
        for key, value in fields.items():
            if not key.replace("_", "").isalnum() or not key.isupper() or not key.isascii():
                raise UsageError(f"sd_notify key must be upper-case ASCII, got {key!r}")
            if "\n" in value:
                raise UsageError(f"sd_notify value of {key} must be one line")
        if self._address is None:
            return False
        payload = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        if len(payload) > _MAX_DATAGRAM:
            raise UsageError(f"sd_notify report of {len(payload)} bytes exceeds {_MAX_DATAGRAM}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else -1
            if self._failed != code:
                _log.warning(
                    "sd_notify report not delivered",
                    fields=sorted(fields),
                    error=errno.errorcode.get(code, str(code)),
                )
            self._failed = code
            return False
        if self._failed is not None:
            _log.info("sd_notify reports delivered again")
            self._failed = None
        return True

    def ready(self, *, status: str | None = None) -> bool:
        """Report that start-up is complete (``READY=1``), optionally with a status line.

        Args:
            status: the text ``systemctl status`` shows; control characters become spaces.

        Returns:
            Whether the report was sent.
        """
        if status is None:
            return self.send(READY="1")
        return self.send(READY="1", STATUS=_status_line(status))

    def status(self, text: str) -> bool:
        """Report a one-line status (``STATUS=``), shown by ``systemctl status``.

        Args:
            text: the status; control characters become spaces, long text is cut to 200 chars.

        Returns:
            Whether the report was sent.
        """
        return self.send(STATUS=_status_line(text))

    def stopping(self) -> bool:
        """Report that shutdown has begun (``STOPPING=1``).

        Returns:
            Whether the report was sent.
        """
        return self.send(STOPPING="1")

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``). Prefer :class:`Watchdog`, which pings only while
        the main loops are alive.

        Returns:
            Whether the report was sent.
        """
        return self.send(WATCHDOG="1")


@dataclass(slots=True)
class _Loop:
    within: float
    last_beat: float


class Heartbeats:
    """Which registered loops have gone quiet: the watchdog's decision, without I/O or clock.

    Every method takes ``now``, a monotonic time in seconds.
    """

    __slots__ = ("_loops",)

    def __init__(self) -> None:
        self._loops: dict[str, _Loop] = {}

    def register(self, name: str, *, within: float, now: float) -> None:
        """Start watching a loop; it counts as having beaten at ``now``.

        Args:
            name: the loop's name, unique among the registered ones.
            within: the longest silence, in seconds, that still counts as alive.
            now: the current time.

        Raises:
            UsageError: an empty or already registered name, or ``within`` not positive.
        """
        if not name:
            raise UsageError("a watched loop needs a name")
        if name in self._loops:
            raise UsageError(f"loop {name!r} is already registered with the watchdog")
        if not within > 0:
            raise UsageError(f"within must be > 0, got {within!r}")
        self._loops[name] = _Loop(within=within, last_beat=now)

    def unregister(self, name: str) -> None:
        """Stop watching a loop that ended on purpose (a finished provisioning loop).

        Raises:
            UsageError: the name is not registered.
        """
        if self._loops.pop(name, None) is None:
            raise UsageError(f"loop {name!r} is not registered with the watchdog")

    def beat(self, name: str, *, now: float) -> None:
        """Record that a loop is alive.

        Raises:
            UsageError: the name is not registered (a typo would otherwise pass unnoticed).
        """
        loop = self._loops.get(name)
        if loop is None:
            raise UsageError(f"loop {name!r} is not registered with the watchdog")
        loop.last_beat = max(loop.last_beat, now)

    def stale(self, *, now: float) -> dict[str, float]:
        """The loops silent for longer than they may be, with how long each has been silent.

        Returns:
            ``{name: seconds since its last beat}``, empty when every loop is alive.
        """
        return {
            name: now - loop.last_beat
            for name, loop in sorted(self._loops.items())
            if now - loop.last_beat > loop.within
        }

    @property
    def names(self) -> tuple[str, ...]:
        """The registered loops, sorted."""
        return tuple(sorted(self._loops))


class Watchdog:
    """Pings the systemd watchdog every ``interval`` while every registered loop is alive.

    An async context manager: entering starts one task named ``sd-watchdog`` in a task group the
    watchdog owns; leaving (the supervisor's shutdown) stops it. Without a watchdog (no
    ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` naming another process, or notifications off) no task
    runs, and :meth:`register` and :meth:`beat` still check their names, so code behaves the
    same under systemd and without it.

    When a loop goes quiet the pings stop and one error names the loops; if they beat again
    before systemd acts, pings resume and that is logged too.
    """

    def __init__(
        self,
        *,
        notifier: Notifier,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        notifier: where pings go; its watchdog timeout sets the default interval.
        interval: seconds between pings; half the watchdog timeout by default (as systemd
            advises), ``None`` without a watchdog. Also the default silence a loop may keep.
        clock: a monotonic clock in seconds (tests may pass their own).

        Raises:
            UsageError: ``interval`` is not positive.
        """
        if interval is None and notifier.watchdog_timeout is not None:
            interval = notifier.watchdog_timeout / 2
        if interval is not None and not interval > 0:
            raise UsageError(f"interval must be > 0, got {interval!r}")
        self._notifier = notifier
        self._interval = interval
        self._clock = clock
        self._heartbeats = Heartbeats()
        self._withheld = False
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float | None:
        """Seconds between pings, and the default longest silence of a loop; ``None`` when off."""
        return self._interval

    @property
    def beat_period(self) -> float | None:
        """How often a loop should beat to keep a margin: half of :attr:`interval`.

        A loop that waits for input (an MQTT message, a retry delay) should wake at least this
        often to beat, for instance by waiting under ``asyncio.timeout(watchdog.beat_period)``.
        """
        return None if self._interval is None else self._interval / 2

    @property
    def active(self) -> bool:
        """Whether pings are being sent (there is a watchdog and somewhere to send to)."""
        return self._interval is not None and self._notifier.enabled

    def register(self, name: str, *, within: float | None = None) -> None:
        """Watch a main loop from now on.

        Args:
            name: the loop's name (``link``, ``publisher``), as it will call :meth:`beat`.
            within: the longest silence in seconds that still counts as alive;
                :attr:`interval` by default (or one hour without a watchdog, unused then).

        Raises:
            UsageError: an empty or duplicate name, or ``within`` not positive.
        """
        default = self._interval if self._interval is not None else 3600.0
        self._heartbeats.register(
            name, within=default if within is None else within, now=self._clock()
        )

    def unregister(self, name: str) -> None:
        """Stop watching a loop that has finished on purpose.

        Raises:
            UsageError: the name is not registered.
        """
        self._heartbeats.unregister(name)

    def beat(self, name: str) -> None:
        """Say that the loop ``name`` is alive. Cheap: call it on every turn of the loop.

        Raises:
            UsageError: the name is not registered.
        """
        self._heartbeats.beat(name, now=self._clock())

    def check(self) -> bool:
        """Ping now if every loop is alive; log the first time they are not.

        Returns:
            Whether every registered loop is alive (so a ping was due).
        """
        stale = self._heartbeats.stale(now=self._clock())
        if stale:
            if not self._withheld:
                _log.error(
                    "watchdog pings withheld: main loop not responding",
                    loops=sorted(stale),
                    silent_s={name: round(seconds, 3) for name, seconds in stale.items()},
                )
            self._withheld = True
            return False
        if self._withheld:
            _log.warning("watchdog pings resumed: every main loop responds again")
            self._withheld = False
        self._notifier.watchdog()
        return True

    async def _run(self, interval: float) -> None:
        # The first ping waits one interval: systemd allows twice that, and a daemon that
        # reports READY=1 soon after entering sends it before its first WATCHDOG=1.
        while True:
            await asyncio.sleep(interval)
            self.check()

    async def __aenter__(self) -> Self:
        if self._group is not None:
            raise UsageError("a Watchdog can be entered once")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        if self.active and self._interval is not None:
            self._task = self._group.create_task(self._run(self._interval), name=WATCHDOG_TASK_NAME)
            _log.info(
                "watchdog armed", interval_s=self._interval, loops=list(self._heartbeats.names)
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._task is not None:
            self._task.cancel("watchdog stopped")
        group = self._group
        if group is None:
            return None
        # The body's exception is not handed to the group, which would wrap it in an
        # ExceptionGroup: the group only waits for the cancelled task, and the body's own
        # exception, if any, propagates unchanged.
        await group.__aexit__(None, None, None)
        return None
