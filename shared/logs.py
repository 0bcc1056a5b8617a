"""Logging set-up for both daemons: one structlog pipeline, configured once by each entry point.

Modules never configure logging; they call ``structlog.get_logger()`` and bind per-task context
with ``structlog.contextvars.bound_contextvars(device=..., shard=...)``. Each ``__main__`` calls
:func:`configure_logging` once, before anything logs.

The pipeline, in order:

1. ``merge_contextvars``: context bound by the running task.
2. the level name and a UTC ISO-8601 timestamp (the timestamp is left out for syslog, which
   stamps every line itself).
3. stack and exception info rendered to strings (``stack``, ``exception``), so that the next
   step sees the text of a traceback too.
4. :class:`SecretRedactor`: the second line of defence. Values under secret-bearing keys are
   masked wherever they sit (nested dicts and lists included), and secret-looking fragments are
   masked inside every string (a PEM private key block, ``Bearer <token>``, an
   ``Authorization:`` header, ``password=...``). The first line of defence is never passing a
   secret to a logger at all.
5. the renderer:

   - ``keyvalue``: one line per event, ``timestamp=... level=... event=... key=value ...``; the
     remaining keys sorted so the order is stable; values with spaces, quotes or ``=`` are
     double-quoted; control characters escaped, so a traceback stays on one line; no colours.
     Meant for syslog (``logread``) or stderr (journald).
   - ``json``: one JSON object per line, for ECS and the awslogs driver.

Libraries that log through the standard library (aiomqtt, paho, botocore, asyncio) are routed
into the same pipeline by a handler on the root logger, tagged ``logger=<name>``, so they share
the format, the destination, the level and the redaction.

Syslog is one RFC 3164 datagram per event on a non-blocking Unix datagram socket (``/dev/log``
by default, configurable so tests can bind their own), not the ``syslog`` module, whose socket
path cannot be chosen and whose writes block when the reader stalls. When the socket is absent,
logs go to stderr and the first event says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Iterable, Mapping
from logging.handlers import SysLogHandler
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from shared.errors import UsageError

__all__ = [
    "DEFAULT_SECRET_KEYS",
    "DEFAULT_SYSLOG_ADDRESS",
    "REDACTED",
    "LogDestination",
    "LogStyle",
    "SecretRedactor",
    "configure_logging",
    "render_keyvalue",
    "reset_logging",
]

LogStyle = Literal["keyvalue", "json"]
LogDestination = Literal["stderr", "stdout", "syslog"]

REDACTED: Final = "[redacted]"
DEFAULT_SYSLOG_ADDRESS: Final = "/dev/log"

DEFAULT_SECRET_KEYS: Final[frozenset[str]] = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "session_token",
        "authorization",
        "cookie",
        "set_cookie",
        "api_key",
        "apikey",
        "private_key",
        "key_pem",
        "credential",
        "credentials",
    }
)
"""Key names whose values are always masked.

A key matches when one of these names appears in it as a whole ``_``-separated segment run,
after the key is lower-cased and camelCase or ``-``/``.`` separators are turned into ``_``:
``password`` masks ``password``, ``db_password``, ``AIRVANTAGE_PASSWORD`` and ``passwordFile``;
``token`` masks ``accessToken`` and ``token_expires_at`` (over-masking is the safe side), but not
``tokens``. Extend it with ``configure_logging(extra_secret_keys=...)``.
"""

_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_STYLES: Final = ("keyvalue", "json")
_DESTINATIONS: Final = ("stderr", "stdout", "syslog")
_FIRST_KEYS: Final = ("timestamp", "level", "event")
# Deeper nesting than this in a log event is a bug; masking the rest also stops a cycle.
_MAX_DEPTH: Final = 16
_KEY_CACHE_SIZE: Final = 4096
_CAMEL_BOUNDARY: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_WORD: Final = re.compile(r"[^a-z0-9]+")

_PEM_PRIVATE_KEY: Final = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
# Only Bearer on its own: "basic" is an everyday word; Basic credentials are caught in their
# Authorization header instead.
_BEARER: Final = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# The rest of an Authorization header value, up to the end of the line or of a quoted string.
_AUTHORIZATION: Final = re.compile(
    r"""(authorization["']?\s*[:=]\s*["']?)[^"'\r\n,}]+""", re.IGNORECASE
)


def _normalise_key(key: str) -> str:
    return _NON_WORD.sub("_", _CAMEL_BOUNDARY.sub("_", key).lower()).strip("_")


class SecretRedactor:
    """A structlog processor that masks secrets anywhere in an event.

    Args:
        secret_keys: key names whose values are masked (see :data:`DEFAULT_SECRET_KEYS` for the
            matching rule); defaults to :data:`DEFAULT_SECRET_KEYS`.
        mask: what a secret is replaced with.

    The returned event is a copy: containers bound by the caller are never changed. Values
    that are not strings, numbers, booleans, ``None`` or containers (exceptions, paths, objects)
    are turned into their ``str()`` and scrubbed, since a renderer would print that text anyway.
    """

    __slots__ = ("_assignment", "_key_cache", "_keys", "_mask", "_triggers")

    def __init__(
        self, *, secret_keys: Iterable[str] = DEFAULT_SECRET_KEYS, mask: str = REDACTED
    ) -> None:
        keys = sorted({_normalise_key(k) for k in secret_keys} - {""}, key=len, reverse=True)
        if not keys:
            raise UsageError("SecretRedactor needs at least one secret key name")
        self._keys = tuple(f"_{k}_" for k in keys)
        self._key_cache: dict[str, bool] = {}
        self._mask = mask
        # Every pattern below needs one of these words (compared without "_" and "-"); most
        # strings hold none of them, and a few substring tests cost far less than the regexes.
        self._triggers = (*{k.replace("_", "") for k in keys}, "private key", "bearer")
        # ``client_secret`` also matches ``client-secret`` and ``clientsecret`` in free text.
        alternation = "|".join(re.escape(k).replace("_", "[_-]?") for k in keys)
        # ``password=hunter2``, ``"client_secret": "x"``, ``db_password: x`` inside free text;
        # a value already masked (by the Authorization rule) is left alone.
        self._assignment = re.compile(
            rf"""((?:{alternation})["']?\s*[:=]\s*["']?)(?!{re.escape(mask)})[^\s"'&,;}}\]]+""",
            re.IGNORECASE,
        )

    def is_secret_key(self, key: object) -> bool:
        """Tell whether values under ``key`` are masked.

        Args:
            key: a mapping key of any type; non-strings are matched on their ``str()``.

        Returns:
            ``True`` when the key names a secret.
        """
        text = str(key)
        known = self._key_cache.get(text)
        if known is None:
            wrapped = f"_{_normalise_key(text)}_"
            known = any(name in wrapped for name in self._keys)
            # Keys come from code, so they are few; the bound only guards against data as keys.
            if len(self._key_cache) < _KEY_CACHE_SIZE:
                self._key_cache[text] = known
        return known

    def scrub(self, text: str) -> str:
        """Mask secret-looking fragments inside free text.

        Args:
            text: any string (an event message, an exception's text, a traceback).

        Returns:
            The text with PEM private key blocks, ``Bearer`` tokens,
            ``Authorization`` header values and ``<secret key>=<value>`` assignments masked.
        """
        lowered = text.lower().replace("_", "").replace("-", "")
        if not any(trigger in lowered for trigger in self._triggers):
            return text
        text = _PEM_PRIVATE_KEY.sub(self._mask, text)
        text = _BEARER.sub(lambda m: f"{m.group(1)} {self._mask}", text)
        text = _AUTHORIZATION.sub(lambda m: f"{m.group(1)}{self._mask}", text)
        return self._assignment.sub(lambda m: f"{m.group(1)}{self._mask}", text)

    def redact(self, value: object, depth: int = 0) -> object:
        """Return a copy of ``value`` with every secret masked.

        Args:
            value: a log value: scalar, string, mapping, sequence or any object.
            depth: current nesting depth (callers leave it at 0).

        Returns:
            The redacted copy.
        """
        result: object
        if value is None or isinstance(value, bool | int | float):
            result = value
        elif isinstance(value, str):
            result = self.scrub(value)
        elif depth >= _MAX_DEPTH:
            result = self._mask
        elif isinstance(value, Mapping):
            result = {
                k: self._mask if self.is_secret_key(k) else self.redact(v, depth + 1)
                for k, v in value.items()
            }
        elif isinstance(value, list | tuple | set | frozenset):
            result = [self.redact(item, depth + 1) for item in value]
        elif isinstance(value, bytes | bytearray):
            result = self.scrub(bytes(value).decode("utf-8", "backslashreplace"))
        else:
            result = self.scrub(str(value))
        return result

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """Redact one event (the structlog processor protocol)."""
        return {
            key: self._mask if self.is_secret_key(key) else self.redact(value)
            for key, value in event_dict.items()
        }


_ESCAPES: Final[Mapping[int, str]] = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)},
    ord("\\"): "\\\\",
    ord('"'): '\\"',
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
_NEEDS_QUOTES: Final = re.compile(r'[\s="\\]')


def _escape(text: str) -> str:
    text = text.translate(_ESCAPES)
    if not text.isprintable():
        # Unicode line and paragraph separators and the like: keep the line one line.
        text = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)
    return text


def _format_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping | list | tuple):
        text = json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    if text and not _NEEDS_QUOTES.search(text) and text.isprintable():
        return text
    return f'"{_escape(text)}"'


def render_keyvalue(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    """Render an event as one ``key=value`` line (the structlog renderer protocol).

    ``timestamp``, ``level`` and ``event`` come first when present, then the other keys sorted.
    A value is double-quoted when it is empty or holds a space, ``=``, ``"``, ``\\`` or a
    non-printable character; inside quotes ``\\``, ``"`` and control characters are escaped,
    so every event is exactly one line. Dicts and lists are rendered as compact JSON.

    Returns:
        The line, without a trailing newline.
    """
    first = [k for k in _FIRST_KEYS if k in event_dict]
    rest = sorted(k for k in event_dict if k not in _FIRST_KEYS)
    return " ".join(f"{key}={_format_value(event_dict[key])}" for key in (*first, *rest))


def _first_keys_first(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level and event first, so JSON lines read well unparsed too."""
    ordered = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


# syslog(3) severities for the five levels structlog knows.
_SEVERITY: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _SyslogWriter:
    """The wrapped logger structlog writes rendered lines to when the destination is syslog.

    One RFC 3164 datagram per line (``<PRI>ident[pid]: line``; syslogd adds host and time) on a
    connected Unix datagram socket. The socket is non-blocking on purpose: when the syslog reader
    stalls its queue fills after about a dozen datagrams, and a blocking send would then freeze
    the caller — usually the event loop, the whole daemon — until the watchdog kills it. A line
    with no room is dropped and counted instead, and the count is reported (as a warning line)
    once lines get through again. Not a :class:`logging.Logger`: nothing propagates to the root
    logger's handlers.
    """

    __slots__ = ("address", "dropped", "facility", "prefix", "reported", "sock")

    def __init__(self, *, address: str, ident: str, facility: int) -> None:
        self.address = address
        self.facility = facility
        self.prefix = f"{ident}[{os.getpid()}]: "
        self.dropped = 0
        self.reported = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)  # noqa: FBT003 - the socket API's own positional flag

    def close(self) -> None:
        self.sock.close()

    def _send(self, levelno: int, line: str) -> bool:
        datagram = f"<{self.facility * 8 + _SEVERITY[levelno]}>{self.prefix}{line}\x00"
        try:
            self.sock.send(datagram.encode("utf-8", "replace"))
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError:
            # syslogd restarted: reconnect once; a line lost meanwhile is counted, never raised.
            try:
                self.sock.close()
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.connect(self.address)
                self.sock.setblocking(False)  # noqa: FBT003 - the socket API's own flag
                self.sock.send(datagram.encode("utf-8", "replace"))
            except OSError:
                self.dropped += 1
                return False
        return True

    def _emit(self, levelno: int, line: str) -> None:
        if self._send(levelno, line) and self.dropped > self.reported:
            count = self.dropped - self.reported
            if self._send(logging.WARNING, f"level=warning event=syslog.dropped count={count}"):
                self.reported += count

    def debug(self, line: str) -> None:
        self._emit(logging.DEBUG, line)

    def info(self, line: str) -> None:
        self._emit(logging.INFO, line)

    def warning(self, line: str) -> None:
        self._emit(logging.WARNING, line)

    def error(self, line: str) -> None:
        self._emit(logging.ERROR, line)

    def critical(self, line: str) -> None:
        self._emit(logging.CRITICAL, line)


class _StdlibBridge(logging.Handler):
    """Feeds records of stdlib-logging libraries (aiomqtt, paho, botocore, asyncio) into the
    structlog pipeline, so they share its format, destination, level and redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        # structlog knows the five standard levels only; custom ones round down into them.
        levelno = min(max(record.levelno // 10 * 10, logging.DEBUG), logging.CRITICAL)
        extra: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            extra["exc_info"] = record.exc_info
        try:
            structlog.get_logger().log(levelno, record.getMessage(), **extra)
        except Exception:  # noqa: BLE001 - logging must never raise; stdlib reports it instead
            self.handleError(record)


class _Installed:
    """What the last configure installed, so the next one (or a reset) removes it first."""

    syslog: _SyslogWriter | None = None
    bridge: _StdlibBridge | None = None
    root_level: int | None = None


def _close_syslog() -> None:
    handler = _Installed.syslog
    _Installed.syslog = None
    if handler is not None:
        handler.close()


def _remove_bridge() -> None:
    bridge = _Installed.bridge
    _Installed.bridge = None
    root = logging.getLogger()
    if bridge is not None:
        root.removeHandler(bridge)
    if _Installed.root_level is not None:
        root.setLevel(_Installed.root_level)
        _Installed.root_level = None


def _install_bridge(level: int) -> None:
    root = logging.getLogger()
    _Installed.root_level = root.level
    # The root level gates which records are even created; structlog filters again anyway.
    root.setLevel(level)
    bridge = _StdlibBridge(level)
    root.addHandler(bridge)
    _Installed.bridge = bridge


def _open_syslog(*, address: str, ident: str, facility: int) -> _SyslogWriter:
    """Connect to the syslog socket; raises OSError when it is absent or refuses us."""
    writer = _SyslogWriter(address=address, ident=ident, facility=facility)
    _Installed.syslog = writer
    return writer


def _check_arguments(*, style: str, destination: str, level: str, ident: str) -> int:
    """Validate configure_logging's arguments; return the numeric level."""
    if style not in _STYLES:
        raise UsageError(f"log style must be one of {', '.join(_STYLES)}, got {style!r}")
    if destination not in _DESTINATIONS:
        raise UsageError(
            f"log destination must be one of {', '.join(_DESTINATIONS)}, got {destination!r}"
        )
    level_number = _LEVELS.get(level.lower())
    if level_number is None:
        raise UsageError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    if not ident or any(ch.isspace() for ch in ident):
        raise UsageError(f"log ident must be a non-empty word, got {ident!r}")
    return level_number


def configure_logging(
    *,
    style: LogStyle,
    destination: LogDestination,
    ident: str,
    level: str = "info",
    syslog_address: str | Path = DEFAULT_SYSLOG_ADDRESS,
    facility: int = SysLogHandler.LOG_DAEMON,
    stream: TextIO | None = None,
    extra_secret_keys: Iterable[str] = (),
    cache_loggers: bool = False,
    capture_stdlib: bool = True,
) -> LogDestination:
    """Configure structlog for the whole process. Safe to call again: it replaces the set-up.

    Args:
        style: ``"keyvalue"`` (syslog/logread style lines) or ``"json"`` (JSON lines).
        destination: ``"stderr"``, ``"stdout"`` or ``"syslog"``.
        ident: the syslog tag (``ztp`` for the device daemon, ``ztp-cloud`` for the cloud one).
        level: the lowest level logged: debug, info, warning, error or critical.
        syslog_address: path of the syslog Unix datagram socket.
        facility: syslog facility (``SysLogHandler.LOG_DAEMON`` by default).
        stream: write here instead of ``sys.stdout``/``sys.stderr`` (tests); ignored for syslog.
        extra_secret_keys: key names masked in addition to :data:`DEFAULT_SECRET_KEYS`.
        cache_loggers: let structlog cache bound loggers on first use (faster; only for entry
            points that configure once, since cached loggers keep the old pipeline).
        capture_stdlib: route records of libraries that use stdlib :mod:`logging` (aiomqtt,
            paho, botocore, asyncio) through the same pipeline, tagged ``logger=<name>``, by a
            handler on the root logger whose level is set to ``level``.

    Returns:
        The destination actually in use: ``"stderr"`` when syslog was asked for but its socket
        is absent or refuses connections (a warning event then says so).

    Raises:
        UsageError: an unknown style, destination or level, or an empty ident.
    """
    level_number = _check_arguments(style=style, destination=destination, level=level, ident=ident)
    _close_syslog()
    _remove_bridge()
    actual: LogDestination = destination
    fallback_reason: str | None = None
    logger_factory: Any
    if destination == "syslog":
        address = str(syslog_address)
        try:
            syslog = _open_syslog(address=address, ident=ident, facility=facility)
        except OSError as exc:
            actual = "stderr"
            fallback_reason = exc.strerror or type(exc).__name__
            logger_factory = structlog.WriteLoggerFactory(file=stream or sys.stderr)
        else:
            logger_factory = lambda *_args: syslog  # noqa: E731 - structlog wants a factory
    else:
        default = sys.stdout if destination == "stdout" else sys.stderr
        logger_factory = structlog.WriteLoggerFactory(file=stream or default)

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if actual != "syslog":
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        SecretRedactor(secret_keys=DEFAULT_SECRET_KEYS | frozenset(extra_secret_keys)),
    ]
    if style == "json":
        processors += [
            _first_keys_first,
            structlog.processors.JSONRenderer(default=str, separators=(",", ":")),
        ]
    else:
        processors.append(render_keyvalue)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        context_class=dict,
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache_loggers,
    )
    if capture_stdlib:
        _install_bridge(level_number)
    if fallback_reason is not None:
        structlog.get_logger().warning(
            "syslog socket unusable, logging to stderr",
            syslog_address=str(syslog_address),
            reason=fallback_reason,
        )
    return actual


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests): close the syslog handler, take the stdlib
    bridge off the root logger and restore its level, restore structlog's defaults."""
    _close_syslog()
    _remove_bridge()
    structlog.reset_defaults()
