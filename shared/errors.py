"""The exception hierarchy of the ``shared`` package.

A leaf module: it imports nothing of ours, so every other module can import it.

The classes are split by who is at fault, so a caller can decide what to do without reading
messages:

- :class:`UsageError`: our own side asked for something impossible (a bad argument, a bad
  configuration file). Fix the caller or the configuration; retrying will not help.
- :class:`PeerError`: a remote peer (a device, AirVantage, the Kinesis connector) sent data we
  refuse. Log it with context, answer the peer if the protocol allows, and keep running.
- :class:`TransportError`: the path to a peer failed (connection refused, timeout). Retry with
  backoff.

Every error carries structured attributes so logs and metrics can use them without parsing text.
No error message ever includes a secret: callers pass descriptions of values, never the values of
secret-bearing fields.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "DigestMismatchError",
    "FragmentConflictError",
    "FragmentError",
    "FragmentFormatError",
    "InvalidValueError",
    "LimitExceededError",
    "MessageError",
    "PeerError",
    "TransportError",
    "UsageError",
    "WireFormatError",
    "ZtpError",
]


def _describe(value: object, *, limit: int = 60) -> str:
    """Render a received value for an error message: short, printable, never huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class ZtpError(Exception):
    """Base of every error raised by the ztp packages."""


class UsageError(ZtpError):
    """Local misuse: a bad argument or configuration on our own side."""


class ConfigError(UsageError):
    """A configuration value is missing or invalid.

    Attributes:
        key: the dotted configuration key (``airvantage.password``), or the environment variable.
        reason: what is wrong with it, never the value of a secret.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"configuration key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class InvalidValueError(UsageError):
    """A value built on our own side breaks a wire-format or message rule.

    The local twin of :class:`DecodeError`: the same structured attributes, but the caller is at
    fault, not a peer. Decoders translate it into their peer error.

    Attributes:
        field: the offending field (``path``, ``timestamp_ms``, ``request_id``).
        expected: what the field must be.
        got: a short description of what was given (truncated, never a secret).
        value: the value itself, for a decoder that re-raises it as a peer error.
    """

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = _describe(got)
        self.value = got
        super().__init__(f"{field}: expected {expected}, got {self.got}")


class TransportError(ZtpError):
    """The path to a peer failed: retry with backoff."""


class PeerError(ZtpError):
    """A remote peer sent something we refuse."""


class DecodeError(PeerError):
    """Received data does not have the expected shape.

    Attributes:
        field: where in the input the problem is (``content.system.id``, ``header.index``).
        expected: what was expected there.
        got: a short description of what was found (truncated, never a secret).
    """

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = _describe(got)
        super().__init__(f"{field}: expected {expected}, got {self.got}")


class FragmentError(DecodeError):
    """A certificate or request fragment is malformed or cannot be reassembled."""


class FragmentFormatError(FragmentError):
    """A single fragment does not parse (header, index, count, alphabet)."""


class FragmentConflictError(FragmentError):
    """A fragment disagrees with one already held for the same transfer and index."""


class DigestMismatchError(FragmentError):
    """The reassembled payload does not match the digest its fragments announced."""


class LimitExceededError(PeerError):
    """Input exceeds a configured bound.

    Attributes:
        limit_name: which bound (``max_fragments``, ``max_payload_bytes``, ``max_transfers``).
        limit: the bound in force.
        actual: the value that exceeded it.
    """

    def __init__(self, limit_name: str, limit: int, actual: int) -> None:
        super().__init__(f"{limit_name} exceeded: limit {limit}, got {actual}")
        self.limit_name = limit_name
        self.limit = limit
        self.actual = actual


class MessageError(DecodeError):
    """A ztp message (request, delivery, status) does not decode."""


class WireFormatError(DecodeError):
    """An AirVantage payload (MQTT data, task, ack, Kinesis envelope) does not decode."""
