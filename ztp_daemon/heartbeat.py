"""The heartbeat: a periodic health message put into the outbox like any other message.

Theory of operation
===================

Every ``interval`` seconds (and once at start), :class:`Heartbeat` samples the process and the
system (:func:`sample_system`, blocking reads of ``/proc`` and the certificate file, run in a
worker thread), builds the payload with the pure :func:`health_payload`, and puts it into the
outbox on ``dt/<thing>/health``. It goes through the outbox so it shares the publisher's
guarantees, and so a heartbeat also reports the outbox's own depth and drops. A full outbox (policy
REFUSE) skips that beat with a warning rather than blocking: a health message is not worth
back-pressure.

The payload (JSON)::

    {"ts": "2026-01-01T00:00:00Z", "uptime_s": 3600, "system_uptime_s": 86400,
     "load": [0.1, 0.2, 0.3],
     "memory": {"rss_bytes": ..., "available_bytes": ..., "total_bytes": ...},
     "outbox": {"depth": 0, "bytes": 0, "in_flight": 0, "dropped": 0, "refused": 0},
     "publisher": {"connected": true, "connects": 1, "published": 42},
     "certificate": {"not_after": "2027-01-01T00:00:00Z", "expires_in_s": 31536000}}

Fields that cannot be read on this system are ``null``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog
from cryptography import x509

from shared.errors import UsageError
from ztp_daemon.errors import DeviceError, StorageError
from ztp_daemon.outbox import Outbox, OutboxFullError, OutboxStats
from ztp_daemon.publisher import CredentialSource, Publisher, PublisherStats

__all__ = [
    "Heartbeat",
    "MemoryInfo",
    "SystemSample",
    "certificate_not_after",
    "health_payload",
    "sample_system",
]

_PROC: Final = Path("/proc")
_log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Memory figures in bytes; None where unreadable."""

    rss_bytes: int | None
    available_bytes: int | None
    total_bytes: int | None


@dataclass(frozen=True, slots=True)
class SystemSample:
    """What the heartbeat reads from the system, with no I/O left to do.

    Attributes:
        load: the 1, 5 and 15 minute load averages, or None.
        memory: the process's RSS and the system's available and total memory.
        system_uptime_s: seconds since boot, or None.
        certificate_not_after: when the client certificate expires, or None.
    """

    load: tuple[float, float, float] | None
    memory: MemoryInfo
    system_uptime_s: float | None
    certificate_not_after: dt.datetime | None


def _kib_field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def certificate_not_after(cert_file: Path) -> dt.datetime | None:
    """The expiry of the PEM certificate in ``cert_file`` (UTC), or None if unreadable."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_after_utc


def sample_system(cert_file: Path | None, *, proc: Path = _PROC) -> SystemSample:
    """Read load, memory, uptime and certificate expiry (blocking: run it in a thread).

    Args:
        cert_file: the client certificate, or None when there is none yet.
        proc: the procfs mount (tests point it elsewhere).

    Returns:
        The sample; what cannot be read is None.
    """
    try:
        load: tuple[float, float, float] | None = os.getloadavg()
    except OSError:
        load = None
    status = _read_text(proc / "self" / "status") or ""
    meminfo = _read_text(proc / "meminfo") or ""
    uptime_text = _read_text(proc / "uptime")
    try:
        system_uptime = float(uptime_text.split()[0]) if uptime_text else None
    except (ValueError, IndexError):
        system_uptime = None
    return SystemSample(
        load=load,
        memory=MemoryInfo(
            rss_bytes=_kib_field(status, "VmRSS"),
            available_bytes=_kib_field(meminfo, "MemAvailable"),
            total_bytes=_kib_field(meminfo, "MemTotal"),
        ),
        system_uptime_s=system_uptime,
        certificate_not_after=certificate_not_after(cert_file) if cert_file else None,
    )


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def health_payload(
    *,
    now: dt.datetime,
    uptime_s: float,
    system: SystemSample,
    outbox: OutboxStats,
    publisher: PublisherStats | None,
) -> bytes:
    """Build the health message *(pure)*.

    Args:
        now: the wall-clock time of the sample (timezone-aware).
        uptime_s: seconds since the daemon started.
        system: load, memory, system uptime and certificate expiry.
        outbox: the outbox's counters.
        publisher: the publisher's counters, or None when there is no publisher.

    Returns:
        The compact JSON payload.

    Raises:
        UsageError: ``now`` is naive.
    """
    if now.tzinfo is None:
        raise UsageError("health_payload: now must be timezone-aware")
    expiry = system.certificate_not_after
    body = {
        "ts": _iso(now),
        "uptime_s": round(uptime_s),
        "system_uptime_s": round(system.system_uptime_s) if system.system_uptime_s else None,
        "load": [round(x, 2) for x in system.load] if system.load else None,
        "memory": {
            "rss_bytes": system.memory.rss_bytes,
            "available_bytes": system.memory.available_bytes,
            "total_bytes": system.memory.total_bytes,
        },
        "outbox": {
            "depth": outbox.depth,
            "bytes": outbox.bytes,
            "in_flight": outbox.in_flight,
            "dropped": outbox.dropped,
            "refused": outbox.refused,
        },
        "publisher": (
            {
                "connected": publisher.connected,
                "connects": publisher.connects,
                "published": publisher.published,
            }
            if publisher is not None
            else None
        ),
        "certificate": (
            {
                "not_after": _iso(expiry),
                "expires_in_s": round((expiry - now).total_seconds()),
            }
            if expiry is not None
            else None
        ),
    }
    return json.dumps(body, separators=(",", ":")).encode()


class Heartbeat:
    """Puts a health message into the outbox every ``interval`` seconds; an async context manager.

    Args:
        outbox: the open outbox.
        topic: where the health message goes (``dt/<thing>/health``).
        interval: seconds between beats.
        credentials: where the client certificate is (for its expiry), or None.
        publisher: the publisher whose counters are reported, or None.
        clock: monotonic clock, seconds.
        wall_clock: the current time, timezone-aware.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        topic: str,
        interval: float = 60.0,
        credentials: CredentialSource | None = None,
        publisher: Publisher | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if interval <= 0:
            raise UsageError(f"heartbeat interval must be > 0, got {interval}")
        self._outbox = outbox
        self._topic = topic
        self._interval = interval
        self._credentials = credentials
        self._publisher = publisher
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = clock()
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None
        self.beats = 0

    async def __aenter__(self) -> Self:
        """Start beating (the first beat is immediate)."""
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = group.create_task(self._run(), name="heartbeat")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop beating."""
        if self._task is not None:
            self._task.cancel("heartbeat stopping")
        await self._stack.__aexit__(exc_type, exc, tb)

    async def beat(self) -> str | None:
        """Sample and put one health message now.

        Returns:
            Its message id, or None if the outbox refused it (full) or could not store it.
        """
        cert_file = None
        if self._credentials is not None:
            with contextlib.suppress(UsageError, DeviceError):
                current = self._credentials.current()
                cert_file = current.cert_file if current is not None else None
        system = await asyncio.to_thread(sample_system, cert_file)
        payload = health_payload(
            now=self._wall_clock(),
            uptime_s=self._clock() - self._started,
            system=system,
            outbox=self._outbox.stats(),
            publisher=self._publisher.stats() if self._publisher is not None else None,
        )
        try:
            message_id = await self._outbox.put(self._topic, payload)
        except OutboxFullError as exc:
            _log.warning("heartbeat.skipped", reason=exc.limit_name)
            return None
        except StorageError as exc:
            _log.error("heartbeat.not_stored", error=str(exc))
            return None
        self.beats += 1
        return message_id

    async def _run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self._interval)
