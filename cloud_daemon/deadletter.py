"""Dead-letter sinks: where a record goes when its handler keeps failing.

The consumer never skips a record silently and never lets one record stall its shard: a record
that fails past its retry budget or its maximum age is written to a dead-letter sink with the
reason, and only then does the checkpoint move past it. If the sink itself fails, the consumer
retries the sink and does not checkpoint.

:class:`JsonLinesDeadLetter` (one JSON object per line, appended and flushed to disk) is the
default; anything implementing :class:`DeadLetterSink` can replace it (an SQS queue, an S3
prefix). :class:`MemoryDeadLetter` collects letters in a list for tests.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UsageError

__all__ = ["DeadLetter", "DeadLetterSink", "JsonLinesDeadLetter", "MemoryDeadLetter"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record given up on, with why.

    Attributes:
        stream: the stream name.
        shard_id: the shard it was read from.
        sequence_number: its sequence number (an integer).
        partition_key: its partition key.
        data: its payload, as read.
        arrival: when Kinesis received it.
        attempts: how many times the handler was given it.
        reason: why it was given up (the last failure, never a secret).
        failed_at: when it was given up.
    """

    stream: str
    shard_id: str
    sequence_number: int
    partition_key: str
    data: bytes
    arrival: dt.datetime
    attempts: int
    reason: str
    failed_at: dt.datetime

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise UsageError("dead letter attempts must not be negative")
        if self.arrival.tzinfo is None or self.failed_at.tzinfo is None:
            raise UsageError("dead letter times must be timezone-aware")

    def to_json(self) -> str:
        """One line of JSON (the payload in base64), for files and queues."""
        return json.dumps(
            {
                "stream": self.stream,
                "shard_id": self.shard_id,
                "sequence_number": str(self.sequence_number),
                "partition_key": self.partition_key,
                "data_base64": base64.b64encode(self.data).decode("ascii"),
                "arrival": self.arrival.isoformat(),
                "attempts": self.attempts,
                "reason": self.reason,
                "failed_at": self.failed_at.isoformat(),
            },
            separators=(",", ":"),
        )


class DeadLetterSink(ABC):
    """Where dead letters go. ``put`` returns only once the letter is stored durably."""

    @abstractmethod
    async def put(self, letter: DeadLetter) -> None:
        """Store one dead letter.

        Raises:
            Exception: any failure; the consumer then retries and does not checkpoint.
        """


class MemoryDeadLetter(DeadLetterSink):
    """Dead letters kept in a list (tests)."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def put(self, letter: DeadLetter) -> None:
        """Append ``letter`` to :attr:`letters`."""
        self.letters.append(letter)


class JsonLinesDeadLetter(DeadLetterSink):
    """Append dead letters to a JSON-lines file, one fsync'd line per letter.

    Dead letters are rare, so each write opens, appends, fsyncs and closes the file in a worker
    thread: nothing stays open, and the file can be rotated at any time.
    """

    def __init__(self, path: Path) -> None:
        """Args:
        path: the file to append to (created 0600 when missing: payloads may be sensitive).
        """
        self.path = path

    def _append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    async def put(self, letter: DeadLetter) -> None:
        """Append ``letter`` as one line and fsync.

        Raises:
            OSError: the file could not be written.
        """
        await asyncio.to_thread(self._append, letter.to_json())
