"""The credential bundle: key, certificate and endpoint committed together, versioned.

Layout under the bundle directory (0700)::

    v000001/            0700  one complete bundle, never modified once in place
        key.pem         0600  the private key (absent when the key cannot leave its store)
        certificate.pem 0600  the certificate
        bundle.json     0600  version, certificate id, endpoint, key reference
    v000002/
    current -> v000002        the pointer: a relative symbolic link

A commit builds the new version in a hidden staging directory, fsyncs every file and the
directory, renames it to ``vNNNNNN`` and fsyncs the parent; then it points ``current`` at it by
renaming a new symbolic link over the old one (atomic on POSIX) and fsyncs the parent again. A
reader resolves ``current`` once and reads every file from the version it names, so it sees the
old bundle or the new one, never a mix (the PoC rewrote one certificate file slot by slot while
its MQTT app could read it). Older versions are pruned after the switch, keeping the previous one
for readers still on it and for a rollback.

Committing the certificate that ``current`` already holds is a no-op that returns its version: a
daemon killed between committing and recording the commit stores the re-delivered certificate
once, not twice.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from shared.errors import UsageError
from ztp_daemon.errors import StorageError
from ztp_daemon.state import atomic_write, ensure_private_directory, fsync_directory

__all__ = ["Bundle", "BundleStore"]

_log = structlog.get_logger()
_VERSION_DIR = re.compile(r"v(\d{6,})")
_POINTER = "current"
_READ_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Bundle:
    """One committed bundle, as a reader sees it.

    Attributes:
        version: the bundle's version (1, 2, ...).
        directory: its directory; every path below is inside it.
        certificate_id: the certificate's id (AWS IoT's SHA-256 of the DER, hex).
        endpoint: the IoT data endpoint host name.
        certificate_pem: the certificate.
        certificate_path: the certificate file, for a TLS context.
        key_path: the key file, for a TLS context; ``None`` when the key stays in its store.
        key_reference: where the key lives (the key file, or a store's URI).
    """

    version: int
    directory: Path
    certificate_id: str
    endpoint: str
    certificate_pem: str
    certificate_path: Path
    key_path: Path | None
    key_reference: str

    def __repr__(self) -> str:
        return f"Bundle(version={self.version}, certificate_id={self.certificate_id!r})"


def _version_name(version: int) -> str:
    return f"v{version:06d}"


class BundleStore:
    """Versioned credential bundles under one directory.

    Args:
        directory: the bundle directory (created 0700).
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        """The bundle directory."""
        return self._directory

    def _versions(self) -> list[int]:
        try:
            names = [entry.name for entry in self._directory.iterdir()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(str(self._directory), "list", exc.strerror or str(exc)) from exc
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_DIR.fullmatch(n)))

    def current_version(self) -> int | None:
        """The version ``current`` points at, or ``None``; cheap enough to poll for changes.

        Raises:
            StorageError: the pointer exists but cannot be read or names no version.
        """
        try:
            target = str((self._directory / _POINTER).readlink())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(
                str(self._directory / _POINTER), "read", exc.strerror or str(exc)
            ) from exc
        match = _VERSION_DIR.fullmatch(target)
        if match is None:
            raise StorageError(str(self._directory / _POINTER), "parse", "not a version pointer")
        return int(match.group(1))

    def current(self) -> Bundle | None:
        """Read the bundle ``current`` points at.

        Returns:
            The bundle, or ``None`` before the first commit.

        Raises:
            StorageError: the bundle cannot be read or is inconsistent.
        """
        for _ in range(_READ_ATTEMPTS):
            version = self.current_version()
            if version is None:
                return None
            try:
                return self._read(version)
            except FileNotFoundError:
                # Pruned under our feet after two commits in a row: the pointer has moved on.
                continue
        raise StorageError(str(self._directory), "read", "the bundle kept changing while read")

    def _read(self, version: int) -> Bundle:
        directory = self._directory / _version_name(version)
        meta_path = directory / "bundle.json"
        try:
            meta = json.loads(meta_path.read_bytes())
            certificate_pem = (directory / "certificate.pem").read_text(encoding="ascii")
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise StorageError(str(directory), "read", f"{type(exc).__name__}") from exc
        if not isinstance(meta, dict) or meta.get("version") != version:
            raise StorageError(str(meta_path), "parse", "metadata does not match the version")
        key_file = meta.get("key_file")
        key_path = directory / key_file if isinstance(key_file, str) else None
        if key_path is not None and not key_path.exists():
            raise FileNotFoundError(key_path)
        return Bundle(
            version=version,
            directory=directory,
            certificate_id=str(meta["certificate_id"]),
            endpoint=str(meta["endpoint"]),
            certificate_pem=certificate_pem,
            certificate_path=directory / "certificate.pem",
            key_path=key_path,
            key_reference=str(meta["key_reference"]),
        )

    def commit(
        self,
        *,
        certificate_pem: str,
        endpoint: str,
        certificate_id: str,
        key_pem: bytes | None = None,
        key_reference: str | None = None,
    ) -> int:
        """Commit a new bundle and point ``current`` at it.

        Args:
            certificate_pem: the verified certificate.
            endpoint: the verified IoT data endpoint.
            certificate_id: the certificate's id.
            key_pem: the private key to copy into the bundle (0600), for a file key store.
            key_reference: where the key lives when it cannot be copied (a store's URI).

        Returns:
            The new version, or the current one if it already holds this certificate.

        Raises:
            UsageError: neither or both of ``key_pem`` and ``key_reference``.
            StorageError: any file operation failed; ``current`` is then unchanged.
        """
        if (key_pem is None) == (key_reference is None):
            raise UsageError("give exactly one of key_pem and key_reference")
        ensure_private_directory(self._directory)
        existing = self.current()
        if (
            existing is not None
            and existing.certificate_id == certificate_id
            and existing.certificate_pem == certificate_pem
            and existing.endpoint == endpoint
        ):
            _log.info("bundle_already_current", version=existing.version)
            return existing.version
        version = max([*self._versions(), existing.version if existing else 0]) + 1
        name = _version_name(version)
        staging = self._directory / f".staging-{name}-{secrets.token_hex(4)}"
        try:
            staging.mkdir(mode=0o700)
            staging.chmod(0o700)
            meta: dict[str, object] = {
                "version": version,
                "certificate_id": certificate_id,
                "endpoint": endpoint,
            }
            if key_pem is not None:
                atomic_write(staging / "key.pem", key_pem, mode=0o600)
                meta["key_file"] = "key.pem"
                meta["key_reference"] = str(self._directory / name / "key.pem")
            else:
                meta["key_reference"] = key_reference
            atomic_write(staging / "certificate.pem", certificate_pem.encode("ascii"), mode=0o600)
            atomic_write(
                staging / "bundle.json",
                json.dumps(meta, sort_keys=True).encode("utf-8") + b"\n",
                mode=0o600,
            )
            fsync_directory(staging)
            staging.rename(self._directory / name)
            fsync_directory(self._directory)
            self._point_at(name)
        except (OSError, UnicodeEncodeError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StorageError(str(self._directory / name), "commit", str(exc)) from exc
        _log.info("bundle_committed", version=version, certificate_id=certificate_id)
        self._prune(keep={version, existing.version if existing else version})
        return version

    def _point_at(self, name: str) -> None:
        link = self._directory / f".{_POINTER}-{secrets.token_hex(4)}"
        try:
            link.symlink_to(name)
            link.replace(self._directory / _POINTER)
        except OSError:
            with contextlib.suppress(OSError):
                link.unlink()
            raise
        fsync_directory(self._directory)

    def _prune(self, *, keep: set[int]) -> None:
        """Remove versions other than ``keep`` and leftovers of interrupted commits."""
        for version in self._versions():
            if version not in keep:
                shutil.rmtree(self._directory / _version_name(version), ignore_errors=True)
        for leftover in self._directory.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self._directory.glob(f".{_POINTER}-*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
