"""The exception hierarchy of the ``sandbox`` package.

A leaf module: it imports only ``shared.errors`` (itself a leaf), so every sandbox module can
import it. The classes are split by who is at fault:

- :class:`SandboxUsageError`: the caller asked for something impossible (a serial that cannot be
  an MQTT username, a broker method called before ``start``). Fix the caller.
- :class:`BrokerError` and its subclasses: a sandbox child process (mosquitto) did not do what
  it was asked (did not start, did not confirm a reload). They carry the broker's name and the
  tail of its log, so a failing test says why without anyone opening files.

No message ever includes a secret: callers pass names and descriptions, never passwords or keys.
"""

from __future__ import annotations

from shared.errors import UsageError

__all__ = [
    "BrokerError",
    "BrokerReloadError",
    "BrokerStartError",
    "SandboxError",
    "SandboxUsageError",
]


class SandboxError(Exception):
    """Base of every error raised by the sandbox."""


class SandboxUsageError(SandboxError, UsageError):
    """Local misuse of a sandbox component: a bad argument, or a call in the wrong state."""


class BrokerError(SandboxError):
    """A sandbox broker (a mosquitto child process) failed.

    Attributes:
        broker: which broker (``device-broker``, ``iot-broker``).
        reason: what went wrong, in a few words.
        log_tail: the last lines mosquitto wrote (its log file and its stderr), possibly empty.
    """

    def __init__(self, broker: str, reason: str, *, log_tail: str = "") -> None:
        message = f"{broker}: {reason}"
        if log_tail:
            message = f"{message}\n--- mosquitto output (tail) ---\n{log_tail}"
        super().__init__(message)
        self.broker = broker
        self.reason = reason
        self.log_tail = log_tail


class BrokerStartError(BrokerError):
    """mosquitto exited, or did not accept connections, within the start-up bound."""


class BrokerReloadError(BrokerError):
    """mosquitto did not confirm a reload (SIGHUP) within its bound."""
