"""What both daemons' command lines share: exit statuses, stop on a signal, the failure report.

Both entry points follow one contract: SIGTERM and SIGINT only set an event that the service
awaits as its shutdown trigger; a :class:`~shared.errors.ZtpError` that ends the run is logged
once, as one event naming the error type and its reason (a traceback would only bury it), and
becomes the exit status: 2 for our own misuse or configuration, 1 for anything else.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import structlog

from shared.errors import UsageError, ZtpError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "STOP_SIGNALS",
    "failure_exit_status",
    "first_ztp_error",
    "stop_on_signals",
]

EXIT_OK: Final = 0
#: A runtime failure: a peer, the transport, storage.
EXIT_FAILURE: Final = 1
#: A usage or configuration error: retrying the same command will not help.
EXIT_USAGE: Final = 2
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@asynccontextmanager
async def stop_on_signals() -> AsyncIterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets, for as long as the block runs.

    The handlers only set the event; the service decides how to stop. They are removed on leaving.

    Returns:
        The event (``shutdown=event.wait`` is the usual hand-over).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def first_ztp_error(error: BaseException) -> ZtpError | None:
    """The error to report for a run that ended with ``error``.

    Args:
        error: what the run raised, possibly an exception group from a task group.

    Returns:
        ``error`` itself when it is a :class:`ZtpError`; otherwise the first one found depth first
        inside an exception group; ``None`` when there is none.
    """
    if isinstance(error, ZtpError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = first_ztp_error(inner)
            if found is not None:
                return found
    return None


def failure_exit_status(failure: ZtpError, *, event: str) -> int:
    """Log why the run failed, as one error event, and choose the exit status.

    Args:
        failure: the error that ended the run.
        event: the log event's name (``service.failed``, ``daemon.failed``).

    Returns:
        :data:`EXIT_USAGE` for a :class:`UsageError`, else :data:`EXIT_FAILURE`.
    """
    structlog.get_logger().error(event, error=type(failure).__name__, reason=str(failure))
    return EXIT_USAGE if isinstance(failure, UsageError) else EXIT_FAILURE
