"""Helpers for the publisher, outbox and ingestion tests, and child processes they kill.

Run as ``python -m tests.adapters.publisher_fixtures <command> ...``:

- ``outbox-writer DB``: put messages into the outbox at DB as fast as it can, printing each
  accepted id on its own line (flushed), until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from ztp_daemon.outbox import Outbox

__all__ = ["main"]


async def _outbox_writer(path: Path) -> None:
    async with Outbox(path) as outbox:
        i = 0
        while True:
            futures = [outbox.submit("dt/writer/x", f"m{i + k}".encode()) for k in range(50)]
            i += 50
            for future in futures:
                print(await future, flush=True)


def main(argv: list[str]) -> int:
    """Run one child-process role (see the module docstring)."""
    # stdout carries the role's answers; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    match argv:
        case ["outbox-writer", db]:
            asyncio.run(_outbox_writer(Path(db)))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
