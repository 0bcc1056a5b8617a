"""The exception hierarchy of the device daemon.

A leaf module: it imports only ``shared.errors`` (itself a leaf), so every module of the daemon can
import it. Every class derives from :class:`DeviceError`, and from the shared class that says who
is at fault, so a caller can catch either ``DeviceError`` or ``PeerError``/``UsageError``:

- :class:`IllegalTransitionError` (our own side, a ``UsageError``): the driver fed the provisioning
  machine an event its current state does not accept. A bug in the driver; the machine's state is
  left unchanged.
- :class:`VerificationError` (the peer, a ``PeerError``): a delivered certificate or endpoint is
  refused before anything is stored. Acked ERROR, reported as rejected, retried after backoff.
- :class:`StorageError` (local): the key store, the state file or the credential bundle could not
  be read or written. Not the peer's fault and not a bug: disk full, permissions, corruption.
- :class:`LinkError` (the path, a ``TransportError``): the AirVantage link is down or a publish
  on it did not complete. The link reconnects by itself; the caller sends again once it is up.

No message carries a secret: errors name paths, key types and reasons, never key material.
"""

from __future__ import annotations

from shared.errors import PeerError, TransportError, UsageError, ZtpError

__all__ = [
    "BadEndpointError",
    "DeviceError",
    "ExpiredError",
    "IllegalTransitionError",
    "LinkError",
    "MalformedCertificateError",
    "NotYetValidError",
    "StorageError",
    "SubjectMismatchError",
    "UntrustedChainError",
    "VerificationError",
    "WrongKeyError",
]


class DeviceError(ZtpError):
    """Base of every error raised by the device daemon."""


class IllegalTransitionError(DeviceError, UsageError):
    """An event the provisioning machine's current state does not accept.

    Attributes:
        state: the name of the state the machine was (and still is) in.
        event: the name of the event type that was refused.
        reason: why, when it is not simply absent from the transition table.
    """

    def __init__(self, state: str, event: str, reason: str = "not in the transition table") -> None:
        super().__init__(f"event {event} is illegal in state {state}: {reason}")
        self.state = state
        self.event = event
        self.reason = reason


class VerificationError(DeviceError, PeerError):
    """A delivered certificate or endpoint failed a check; nothing was stored.

    Attributes:
        reason: a short stable code (``wrong_key``, ``expired``...) for acks, status reports and
            metrics; subclasses fix it.
        detail: a human-readable explanation (names, dates; never key material).
    """

    reason = "unverified"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class MalformedCertificateError(VerificationError):
    """The delivered certificate does not parse as one PEM X.509 certificate."""

    reason = "malformed_certificate"


class WrongKeyError(VerificationError):
    """The certificate does not carry our public key: it is useless to us (or an attack)."""

    reason = "wrong_key"


class NotYetValidError(VerificationError):
    """The certificate's validity starts in the future (beyond the allowed clock skew)."""

    reason = "not_yet_valid"


class ExpiredError(VerificationError):
    """The certificate's validity has ended."""

    reason = "expired"


class SubjectMismatchError(VerificationError):
    """The certificate's subject CN is not the gateway's serial (when that check is on)."""

    reason = "subject_mismatch"


class UntrustedChainError(VerificationError):
    """The certificate does not chain to the configured CA bundle (when that check is on)."""

    reason = "untrusted_chain"


class BadEndpointError(VerificationError):
    """The delivered endpoint does not look like a host name."""

    reason = "bad_endpoint"


class StorageError(DeviceError):
    """Local storage failed: the key store, the state file or the credential bundle.

    Attributes:
        path: the file or directory involved.
        operation: what was being done (``read``, ``write``, ``parse``...).
    """

    def __init__(self, path: str, operation: str, detail: str) -> None:
        super().__init__(f"{operation} {path}: {detail}")
        self.path = path
        self.operation = operation
        self.detail = detail


class LinkError(DeviceError, TransportError):
    """The AirVantage link is down, or a publish on it did not complete; retry after reconnect.

    Attributes:
        reason: a short description (not connected, CONNACK refused, timeout...).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"AirVantage link: {reason}")
        self.reason = reason
