"""Durable files: the provisioning state record, and the atomic write every store here uses.

The record (:class:`~ztp_daemon.machine.StateRecord`) lives as JSON in ``state.json`` under the
state directory (``/var/lib/ztp`` by default). It is replaced atomically: a temporary file in the
same directory is written and fsynced, renamed over the old file, and the directory is fsynced so
the rename itself survives a power cut. A reader therefore sees the old record or the new one,
never a torn mix, whenever the daemon is killed.

The record holds no secret (the CSR is public), but it is written 0600 like everything under the
state directory, which is 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import structlog

from ztp_daemon.errors import StorageError
from ztp_daemon.machine import State, StateRecord

__all__ = [
    "DEFAULT_STATE_DIRECTORY",
    "FORMAT_VERSION",
    "StateFile",
    "atomic_write",
    "ensure_private_directory",
    "fsync_directory",
    "read_if_present",
    "record_from_json",
    "record_to_json",
]

DEFAULT_STATE_DIRECTORY = Path("/var/lib/ztp")
FORMAT_VERSION = 1
_log = structlog.get_logger()


def fsync_directory(directory: Path) -> None:
    """Make a rename (or a new entry) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_directory(directory: Path) -> None:
    """Create ``directory`` (and parents) if needed, and make it 0700.

    Raises:
        StorageError: it cannot be created or its mode cannot be set.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as exc:
        raise StorageError(str(directory), "create directory", exc.strerror or str(exc)) from exc


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory.

    The temporary file is created with ``mode`` from the start (never wider for an instant) and
    removed if anything fails, so no temporary file is left behind.

    Args:
        path: the file to replace.
        data: its new content.
        mode: its permission bits (0600 by default).

    Raises:
        StorageError: any step failed; ``path`` is then unchanged.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            # The umask may have narrowed the mode; set it exactly.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        fsync_directory(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(str(path), "write", exc.strerror or str(exc)) from exc


def read_if_present(path: Path) -> bytes | None:
    """Read a stored file whose absence is a normal state (a fresh gateway has none yet).

    Args:
        path: the file.

    Returns:
        Its bytes, or ``None`` when it does not exist.

    Raises:
        StorageError: it exists but cannot be read. The caller must not treat that as absent:
            starting afresh over an unreadable key or record would make a second key.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(str(path), "read", exc.strerror or str(exc)) from exc


def record_to_json(record: StateRecord) -> bytes:
    """Encode a record as the JSON of ``state.json``."""
    document = {
        "format": FORMAT_VERSION,
        "state": record.state.value,
        "request_id": record.request_id,
        "csr_pem": record.csr_pem,
        "attempts": record.attempts,
        "next_retry_at": record.next_retry_at,
        "last_error": record.last_error,
        "bundle_version": record.bundle_version,
        "certificate_id": record.certificate_id,
        "not_before": record.not_before,
        "not_after": record.not_after,
        "renew_at": record.renew_at,
    }
    return json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _get(document: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(key)
    # bool is an int to Python; a count or a version is never a bool.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key} must be {kind}, got {type(value).__name__}")
    return value


def record_from_json(data: bytes) -> StateRecord:
    """Decode ``state.json`` (a record written before renewal existed reads with no validity).

    Raises:
        ValueError: not JSON, an unknown format version, or a field of the wrong type or value.
    """
    document = json.loads(data)
    if not isinstance(document, dict):
        # ValueError like every other decoding failure here, so load() has one thing to catch.
        raise ValueError("the state file is not a JSON object")  # noqa: TRY004
    if document.get("format") != FORMAT_VERSION:
        raise ValueError(f"unknown state file format {document.get('format')!r}")
    try:
        none = type(None)
        return StateRecord(
            state=State(_get(document, "state", str)),
            request_id=_get(document, "request_id", str),
            csr_pem=_get(document, "csr_pem", str),
            attempts=_get(document, "attempts", int),
            next_retry_at=_get(document, "next_retry_at", (int, float, none)),
            last_error=_get(document, "last_error", (str, none)),
            bundle_version=_get(document, "bundle_version", (int, none)),
            certificate_id=_get(document, "certificate_id", (str, none)),
            # Absent from records written before renewal existed: read as None.
            not_before=_get(document, "not_before", (int, float, none)),
            not_after=_get(document, "not_after", (int, float, none)),
            renew_at=_get(document, "renew_at", (int, float, none)),
        )
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


class StateFile:
    """The provisioning record in ``<directory>/state.json``.

    Args:
        directory: the state directory (created 0700 on the first save).
    """

    def __init__(self, directory: Path = DEFAULT_STATE_DIRECTORY) -> None:
        self._directory = directory
        self._path = directory / "state.json"

    @property
    def path(self) -> Path:
        """The state file."""
        return self._path

    def load(self) -> StateRecord | None:
        """Read the record.

        Returns:
            The record, or ``None`` when there is none yet (a fresh gateway).

        Raises:
            StorageError: the file exists but cannot be read or does not decode. The daemon must
                not silently start afresh over it: that would make a second key.
        """
        data = read_if_present(self._path)
        if data is None:
            return None
        try:
            record = record_from_json(data)
        except ValueError as exc:
            raise StorageError(str(self._path), "parse", str(exc)) from exc
        _log.debug("state_loaded", state=record.state.value, attempts=record.attempts)
        return record

    def save(self, record: StateRecord) -> None:
        """Replace the record atomically (see :func:`atomic_write`).

        Raises:
            StorageError: the directory or the file cannot be written.
        """
        ensure_private_directory(self._directory)
        # A daemon killed mid-write leaves its temporary file behind; the record itself is whole.
        for leftover in self._directory.glob(f".{self._path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        atomic_write(self._path, record_to_json(record))
        _log.debug("state_saved", state=record.state.value, attempts=record.attempts)
