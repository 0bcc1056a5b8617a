"""Local ingestion: other gateway programs hand messages to the outbox over a Unix socket.

Theory of operation
===================

The socket (path configurable, mode 0660, so the owning group may write) speaks JSON lines. Each
request is one line::

    {"topic": "dt/<thing>/temperature", "payload": {"celsius": 21.5}, "qos": 1}

and gets exactly one reply line, in request order::

    {"ok": true, "id": "<stable message id>"}
    {"ok": false, "error": "topic_forbidden", "detail": "topic: expected under 'dt/<thing>/', ..."}

``payload`` is any JSON value: a string is sent as its UTF-8 bytes, anything else as compact JSON.
``qos`` is optional and must be 1 (the outbox publishes at QoS 1). "ok" means the message is
committed to the outbox: it survives a crash from then on.

Topics are confined under the configured prefixes (``dt/<thing>/`` by default), mirroring the
thing's least-privilege policy: publishing elsewhere would be dropped by AWS IoT anyway, silently;
refusing it here tells the producer why. Error codes (``error``) are stable: ``malformed_json``,
``bad_request``, ``topic_invalid``, ``topic_forbidden``, ``payload_too_large``,
``line_too_long``, ``outbox_full`` (back-pressure: retry later), ``storage_error``,
``unavailable``. A bad line never closes the connection, let alone the socket.

Decoding is a pure core (:class:`LineSplitter`, :func:`parse_request`, :func:`error_reply`); the
server is an async context manager whose connections are named tasks in its TaskGroup. Per
connection, a reader parses and submits lines without waiting for their commits (so one
producer's lines share group commits), and a replier awaits them in order and writes the
replies; at most ``max_pending`` requests are outstanding before the reader stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import structlog

from shared.errors import DecodeError, LimitExceededError, UsageError
from ztp_daemon.errors import DeviceError, StorageError
from ztp_daemon.outbox import (
    Outbox,
    OutboxClosedError,
    OutboxFullError,
    PayloadTooLargeError,
    TopicError,
    check_topic,
)

__all__ = [
    "IngestConfig",
    "IngestRequest",
    "IngestServer",
    "LineSplitter",
    "Overlong",
    "RequestError",
    "TopicForbiddenError",
    "error_reply",
    "ok_reply",
    "parse_request",
]

_READ_CHUNK: Final = 64 * 1024
_log = structlog.get_logger()


class RequestError(DeviceError, DecodeError):
    """An ingestion line does not decode into a request (``code`` goes in the reply)."""

    code = "bad_request"


class _MalformedJsonError(RequestError):
    code = "malformed_json"


class TopicForbiddenError(TopicError):
    """The topic is valid MQTT but outside the prefixes this thing may publish under."""


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """The ingestion socket's settings.

    Attributes:
        socket_path: where the socket is made (its directory must exist).
        allowed_prefixes: topic prefixes a request may publish under (``dt/<thing>/``).
        mode: the socket's permission bits (0660: owner and group may connect).
        max_line_bytes: the longest request line accepted (a 128 KB payload, JSON-escaped).
        max_pending: requests of one connection awaiting their commit before reading pauses.
        max_connections: connections served at once; more are answered ``unavailable``.
    """

    socket_path: Path
    allowed_prefixes: tuple[str, ...]
    mode: int = 0o660
    max_line_bytes: int = 1024 * 1024
    max_pending: int = 256
    max_connections: int = 64

    def __post_init__(self) -> None:
        if not self.allowed_prefixes:
            raise UsageError("ingest: at least one allowed topic prefix is required")
        for prefix in self.allowed_prefixes:
            if not prefix.endswith("/") or "+" in prefix or "#" in prefix:
                raise UsageError(f"ingest: prefix {prefix!r} must end with '/' (no wildcards)")
        if not 0 <= self.mode <= 0o777:
            raise UsageError(f"ingest: mode must be permission bits, got {self.mode:o}")
        if self.max_line_bytes < 1024 or self.max_pending < 1 or self.max_connections < 1:
            raise UsageError("ingest: max_line_bytes >= 1024, max_pending and max_connections >= 1")
        # AF_UNIX paths are limited to 107 bytes on Linux (sun_path is 108 with the NUL).
        if len(os.fsencode(self.socket_path)) > 107:
            raise UsageError(f"ingest: socket path longer than 107 bytes: {self.socket_path}")

    @classmethod
    def for_thing(cls, socket_path: Path, thing_name: str) -> IngestConfig:
        """The usual settings: publish under ``dt/<thing>/`` only."""
        return cls(socket_path=socket_path, allowed_prefixes=(f"dt/{thing_name}/",))


# -- the pure core -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line longer than the limit was discarded (its length so far, at least the limit)."""

    length: int


class LineSplitter:
    """Splits a byte stream into lines, discarding (once) any line longer than ``limit``.

    Args:
        limit: the longest line kept, without its newline.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._discarding = 0  # bytes of an overlong line discarded so far, 0 when not

    def feed(self, data: bytes) -> list[bytes | Overlong]:
        """Add received bytes; return the complete lines (and overlong markers) in order."""
        out: list[bytes | Overlong] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            piece = data[start:end]
            if self._discarding:
                out.append(Overlong(self._discarding + len(piece)))
                self._discarding = 0
            elif len(self._buffer) + len(piece) > self._limit:
                out.append(Overlong(len(self._buffer) + len(piece)))
                self._buffer.clear()
            else:
                self._buffer += piece
                out.append(bytes(self._buffer))
                self._buffer.clear()
            start = end + 1
        rest = data[start:]
        if self._discarding:
            self._discarding += len(rest)
        elif len(self._buffer) + len(rest) > self._limit:
            self._discarding = len(self._buffer) + len(rest)
            self._buffer.clear()
        else:
            self._buffer += rest
        return out

    def end(self) -> list[bytes | Overlong]:
        """The stream ended: a last line without a newline still counts."""
        if self._discarding:
            length, self._discarding = self._discarding, 0
            return [Overlong(length)]
        if self._buffer.strip():
            line = bytes(self._buffer)
            self._buffer.clear()
            return [line]
        return []


@dataclass(frozen=True, slots=True)
class IngestRequest:
    """A decoded request: what to put in the outbox."""

    topic: str
    payload: bytes


def parse_request(line: bytes, allowed_prefixes: Iterable[str]) -> IngestRequest:
    """Decode one request line and check its topic.

    Args:
        line: the line, without its newline.
        allowed_prefixes: the prefixes the topic must start with.

    Returns:
        The topic and the payload bytes.

    Raises:
        RequestError: not JSON, not an object, a missing or mistyped field, a QoS other than 1.
        TopicError: the topic is not publishable (:func:`~ztp_daemon.outbox.check_topic`).
        TopicForbiddenError: the topic is outside ``allowed_prefixes``.
    """
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise _MalformedJsonError("line", "one JSON object", line[:40]) from exc
    if not isinstance(request, dict):
        raise RequestError("line", "a JSON object", type(request).__name__)
    unknown = set(request) - {"topic", "payload", "qos"}
    if unknown:
        raise RequestError("line", "only topic, payload and qos", sorted(unknown))
    topic = request.get("topic")
    if not isinstance(topic, str):
        raise RequestError("topic", "a string", type(topic).__name__)
    if "payload" not in request:
        raise RequestError("payload", "a JSON value", "nothing")
    qos = request.get("qos", 1)
    if qos != 1 or isinstance(qos, bool):
        raise RequestError("qos", "1 (the outbox publishes at QoS 1)", qos)
    check_topic(topic)
    prefixes = tuple(allowed_prefixes)
    if not any(topic.startswith(p) and len(topic) > len(p) for p in prefixes):
        raise TopicForbiddenError("topic", f"a topic under {' or '.join(prefixes)}", topic)
    payload = request["payload"]
    try:
        data = (
            payload.encode()
            if isinstance(payload, str)
            else json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        )
    except UnicodeEncodeError:
        raise RequestError("payload", "valid UTF-8 text", "a lone surrogate") from None
    return IngestRequest(topic, data)


def ok_reply(message_id: str) -> bytes:
    """The reply line for an accepted message."""
    return b'{"ok":true,"id":"' + message_id.encode() + b'"}\n'


def error_reply(error: BaseException | Overlong) -> bytes:
    """The reply line for a refused request: a stable code and a short detail.

    Args:
        error: what went wrong (an error of ours, or an overlong line).

    Returns:
        ``{"ok": false, "error": code, "detail": text}`` and a newline.
    """
    code: str
    match error:
        case Overlong(length=length):
            code, detail = "line_too_long", f"line of at least {length} bytes discarded"
        case TopicForbiddenError():
            code, detail = "topic_forbidden", str(error)
        case TopicError():
            code, detail = "topic_invalid", str(error)
        case RequestError():
            code, detail = error.code, str(error)
        case PayloadTooLargeError():
            code, detail = "payload_too_large", str(error)
        case OutboxFullError():
            code, detail = "outbox_full", str(error)
        case StorageError():
            code, detail = "storage_error", "the outbox could not commit the message"
        case LimitExceededError():
            code, detail = "limit_exceeded", str(error)
        case _:
            code, detail = "unavailable", "the daemon is not accepting messages now"
    body = {"ok": False, "error": code, "detail": detail}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


# -- the server --------------------------------------------------------------------------------

_Pending = asyncio.Future[str] | bytes


class IngestServer:
    """The ingestion socket, an async context manager (listening while inside).

    Args:
        config: socket path, mode, topic prefixes and bounds.
        outbox: the open outbox accepted messages go to.
    """

    def __init__(self, *, config: IngestConfig, outbox: Outbox) -> None:
        self._config = config
        self._outbox = outbox
        self._stack = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0
        self._served = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._log = _log.bind(socket=str(config.socket_path))

    @property
    def path(self) -> Path:
        """The socket's path."""
        return self._config.socket_path

    async def __aenter__(self) -> Self:
        """Create the socket (replacing a stale one) and start accepting connections.

        Raises:
            UsageError: the path holds something other than a stale socket, or another
                process is listening on it.
            OSError: the socket cannot be created.
        """
        path = self._config.socket_path
        await _remove_stale_socket(path)
        self._group = await self._stack.enter_async_context(asyncio.TaskGroup())
        # Until the chmod below the socket has the umask's mode, which never grants more than
        # 0660 would to others (connecting needs write permission), so the window is harmless.
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        try:
            path.chmod(self._config.mode)
        except OSError:
            self._server.close()
            raise
        self._stack.push_async_callback(self._close)
        self._log.info("ingest.listening", mode=f"{self._config.mode:o}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop accepting, end the connections, remove the socket."""
        await self._stack.__aexit__(exc_type, exc, tb)

    async def _close(self) -> None:
        # Runs before the TaskGroup exits: stop accepting, then cancel the connections so the
        # group can finish.
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel("ingest closing")
        with contextlib.suppress(FileNotFoundError):
            self._config.socket_path.unlink()
        self._log.info("ingest.closed", connections_served=self._served)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group = self._group
        if group is None or self._closing:
            # Accepted by the kernel just before the close: nobody will serve it.
            writer.close()
            return
        self._served += 1
        task = group.create_task(
            self._serve(reader, writer), name=f"ingest.connection-{self._served}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before its first step never runs its finally: close here too.
        task.add_done_callback(lambda _task: writer.close())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self._config.max_connections:
            with contextlib.suppress(OSError):
                writer.write(error_reply(ConnectionRefusedError()))
                await writer.drain()
            writer.close()
            return
        self._connections += 1
        pending: asyncio.Queue[_Pending | None] = asyncio.Queue(self._config.max_pending)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(reader, pending), name="ingest.read")
                group.create_task(self._reply(writer, pending), name="ingest.reply")
        except* ConnectionError:
            pass  # the peer went away: nothing to answer
        except* Exception as group:  # noqa: BLE001 - one connection must not take the socket down
            self._log.error(
                "ingest.connection_failed",
                error=repr(group.exceptions[0]),
                errors=len(group.exceptions),
            )
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(
        self, reader: asyncio.StreamReader, pending: asyncio.Queue[_Pending | None]
    ) -> None:
        splitter = LineSplitter(self._config.max_line_bytes)
        prefixes = self._config.allowed_prefixes
        while True:
            data = await reader.read(_READ_CHUNK)
            items = splitter.feed(data) if data else splitter.end()
            for item in items:
                await pending.put(self._submit(item, prefixes))
            if not data:
                await pending.put(None)
                return

    def _submit(self, item: bytes | Overlong, prefixes: tuple[str, ...]) -> _Pending:
        if isinstance(item, Overlong):
            self._log.info("ingest.refused", error="line_too_long", length=item.length)
            return error_reply(item)
        if not item.strip():
            return error_reply(RequestError("line", "one JSON object", "an empty line"))
        try:
            request = parse_request(item, prefixes)
            return self._outbox.submit(request.topic, request.payload)
        except (DecodeError, LimitExceededError, OutboxClosedError) as exc:
            self._log.info("ingest.refused", error=type(exc).__name__, detail=str(exc))
            return error_reply(exc)

    async def _reply(
        self, writer: asyncio.StreamWriter, pending: asyncio.Queue[_Pending | None]
    ) -> None:
        while True:
            item = await pending.get()
            if item is None:
                await writer.drain()
                return
            if isinstance(item, bytes):
                line = item
            else:
                try:
                    line = ok_reply(await item)
                except StorageError as exc:
                    line = error_reply(exc)
            writer.write(line)
            if pending.empty():
                await writer.drain()


def _existing_socket(path: Path) -> bool:
    """Whether ``path`` holds a socket (False if absent; UsageError for anything else)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"ingest: {path} exists and is not a socket")
    return True


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; refuse to touch anything else."""
    if not _existing_socket(path):
        return
    try:
        _reader, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        _unlink(path)
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise UsageError(f"ingest: another process is listening on {path}")
