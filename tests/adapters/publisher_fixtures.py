"""Helpers for the publisher, outbox and ingestion tests, and child processes they kill.

Run as ``python -m tests.adapters.publisher_fixtures <command> ...``:

- ``outbox-writer DB``: put messages into the outbox at DB as fast as it can, printing each
  accepted id on its own line (flushed), until killed.
- ``daemon DB SOCKET CERT KEY CA PORT THING RATE``: the publishing half of the device daemon
  (outbox, publisher, ingestion socket, heartbeat) against a sandbox broker on PORT, pacing
  publishes at RATE per second (0: unpaced); prints ``ready`` once the socket listens, runs until
  SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from sandbox.brokers import ClientCertificate, IotBroker, client_tls_context
from sandbox.pki import SandboxPki
from ztp_daemon.heartbeat import Heartbeat
from ztp_daemon.ingest import IngestConfig, IngestServer
from ztp_daemon.outbox import Outbox
from ztp_daemon.publisher import (
    ClientCredentials,
    CredentialSource,
    FileCredentials,
    Publisher,
    PublisherConfig,
)

__all__ = [
    "GatedCredentials",
    "Observer",
    "Received",
    "fast_config",
    "main",
    "observe",
    "unique_thing_name",
    "wait_until",
]


def unique_thing_name() -> str:
    """A thing name no other test uses."""
    return f"thing-{uuid.uuid4().hex[:12]}"


def fast_config(
    broker: IotBroker, pki: SandboxPki, thing: str, **overrides: Any
) -> PublisherConfig:
    """A publisher configuration for the sandbox broker with test-friendly timings."""
    config = PublisherConfig(
        thing_name=thing,
        host="127.0.0.1",
        port=broker.port,
        ca_file=pki.ca_file,
        keepalive=30,
        connect_timeout=3.0,
        backoff_base=0.2,
        backoff_cap=0.5,
        drain_timeout=2.0,
        credentials_poll_interval=0.1,
        publish_rate=None,
    )
    return replace(config, **overrides)


def credentials_for(cert: ClientCertificate) -> FileCredentials:
    """File credentials for a sandbox client certificate, endpoint 127.0.0.1."""
    return FileCredentials(cert.cert_file, cert.key_file, "127.0.0.1")


class GatedCredentials:
    """Credentials a test can withhold (the publisher then sees "no credentials yet")."""

    def __init__(self, inner: CredentialSource) -> None:
        self._inner = inner
        self._open = True

    def open(self) -> None:
        """Hand out the credentials again."""
        self._open = True

    def close(self) -> None:
        """Withhold the credentials."""
        self._open = False

    def current(self) -> ClientCredentials | None:
        """The inner credentials while open, else None."""
        return self._inner.current() if self._open else None


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` every 10 ms until true, at most ``within`` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - outbox depth has no event to await
            await asyncio.sleep(0.01)


@dataclass(frozen=True, slots=True)
class Received:
    """One message the observer saw."""

    topic: str
    payload: bytes
    message_id: str | None


@dataclass(slots=True)
class Observer:
    """Collects what the IoT broker delivers under a topic filter (as the observer identity)."""

    messages: list[Received] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ids(self) -> set[str]:
        """The distinct message ids seen."""
        return {m.message_id for m in self.messages if m.message_id is not None}

    @property
    def payloads(self) -> set[bytes]:
        """The distinct payloads seen."""
        return {m.payload for m in self.messages}

    async def wait_for(self, distinct_payloads: int, within: float = 10.0) -> None:
        """Wait until ``distinct_payloads`` different payloads arrived (at most ``within`` s)."""
        async with asyncio.timeout(within):
            while len(self.payloads) < distinct_payloads:
                self._changed.clear()
                await self._changed.wait()

    def _add(self, message: aiomqtt.Message) -> None:
        message_id = None
        properties = message.properties
        for key, value in getattr(properties, "UserProperty", None) or []:
            if key == "ztp-id":
                message_id = value
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        self.messages.append(Received(message.topic.value, data, message_id))
        self._changed.set()


@contextlib.asynccontextmanager
async def observe(broker: IotBroker, topic_filter: str) -> AsyncIterator[Observer]:
    """Subscribe as the broker's observer (MQTT 5, to see user properties) while in the block."""
    context: ssl.SSLContext = client_tls_context(broker.address, broker.observer)
    observer = Observer()
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier=f"observer-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        timeout=5,
    ) as client:
        await client.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                observer._add(message)

        async with asyncio.TaskGroup() as group:
            task = group.create_task(collect(), name="observer.collect")
            try:
                yield observer
            finally:
                task.cancel()


async def _outbox_writer(path: Path) -> None:
    async with Outbox(path) as outbox:
        i = 0
        while True:
            futures = [outbox.submit("dt/writer/x", f"m{i + k}".encode()) for k in range(50)]
            i += 50
            for future in futures:
                print(await future, flush=True)


async def _daemon(argv: list[str]) -> None:
    db, sock, cert, key, ca, port, thing, rate = argv
    config = PublisherConfig(
        thing_name=thing,
        host="127.0.0.1",
        port=int(port),
        ca_file=Path(ca),
        keepalive=30,
        connect_timeout=3.0,
        backoff_base=0.2,
        backoff_cap=0.5,
        publish_rate=float(rate) or None,
    )
    credentials = FileCredentials(Path(cert), Path(key), "127.0.0.1")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with (
        Outbox(Path(db)) as outbox,
        Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
        IngestServer(config=IngestConfig.for_thing(Path(sock), thing), outbox=outbox),
        Heartbeat(
            outbox=outbox,
            topic=f"dt/{thing}/health",
            interval=3600,
            credentials=credentials,
            publisher=publisher,
        ),
    ):
        print("ready", flush=True)
        await stop.wait()


def main(argv: list[str]) -> int:
    """Run one child-process role (see the module docstring)."""
    # stdout carries the role's answers; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    match argv:
        case ["outbox-writer", db]:
            asyncio.run(_outbox_writer(Path(db)))
        case ["daemon", *args] if len(args) == 8:
            asyncio.run(_daemon(args))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
