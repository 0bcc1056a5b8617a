"""The base of the cloud daemon's local stores: one SQLite file reached through its own thread.

The lease store and the issuance ledger both keep their single-instance state in a SQLite file.
Each call is one short statement in its own transaction, run on a private one-thread executor
rather than on the event loop: a commit is usually microseconds in WAL mode, but a WAL checkpoint
or a slow disk can block for milliseconds, which would stall every shard's reads. One thread also
satisfies sqlite3's one-connection-per-thread rule, and serialises a store's statements without a
lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from shared.errors import UsageError

__all__ = ["SqliteStore"]

_T = TypeVar("_T")


class SqliteStore:
    """A store in a SQLite database opened in WAL mode, reached only through its worker thread.

    Subclasses run their statements with :meth:`_call`; users open and close the file with
    ``async with``.
    """

    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        synchronous: Literal["NORMAL", "FULL"],
        thread_name: str,
    ) -> None:
        """Args:
        path: the database file (created with its table when missing).
        schema: the ``CREATE TABLE IF NOT EXISTS`` statement run on opening.
        synchronous: SQLite's ``synchronous`` pragma: FULL where a lost commit costs more
            than a slower one.
        thread_name: the worker thread's name prefix (seen in thread dumps).
        """
        self._path = path
        self._schema = schema
        self._synchronous = synchronous
        self._thread_name = thread_name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def _call(self, func: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``func(connection)`` on the database thread.

        Args:
            func: the statements to run; it commits itself where it writes.

        Returns:
            What ``func`` returns.

        Raises:
            UsageError: the database is not open (used outside ``async with``).
        """
        if self._executor is None or self._conn is None:
            raise UsageError(f"{type(self).__name__} used outside 'async with'")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: func(conn))

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self._path, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(self._schema)
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None and self._executor is not None:
            # Shielded: a cancelled shutdown must still close the file, or the WAL stays behind.
            await asyncio.shield(
                asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
            )
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._conn = None
        self._executor = None
