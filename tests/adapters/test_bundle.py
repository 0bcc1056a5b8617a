"""The credential bundle store on a real file system: commits, switch, modes, readers, pruning."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from shared.errors import UsageError
from ztp_daemon.bundle import Bundle, BundleStore
from ztp_daemon.errors import StorageError

KEY_PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(n: int) -> str:
    # The store does not parse certificates; a numbered stand-in shows which version was read.
    return f"-----BEGIN CERTIFICATE-----\nnumber {n}\n-----END CERTIFICATE-----\n"


def commit(store: BundleStore, n: int, *, key: bytes | None = None) -> int:
    return store.commit(
        certificate_pem=cert(n),
        endpoint=f"e{n}.iot.example",
        certificate_id=f"{n:064x}",
        key_pem=key if key is not None else KEY_PEM + f"#{n}".encode(),
    )


def test_first_commit_layout_and_modes(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    assert store.current() is None
    assert store.current_version() is None
    assert commit(store, 1, key=KEY_PEM) == 1
    bundle = store.current()
    assert bundle is not None
    assert bundle.version == 1
    assert bundle.certificate_pem == cert(1)
    assert bundle.endpoint == "e1.iot.example"
    assert bundle.certificate_id == f"{1:064x}"
    assert bundle.key_path is not None
    assert bundle.key_path.read_bytes() == KEY_PEM
    assert bundle.key_reference == str(bundle.key_path)
    assert bundle.certificate_path.read_text() == cert(1)
    assert mode(store.directory) == 0o700
    assert mode(bundle.directory) == 0o700
    for name in ("key.pem", "certificate.pem", "bundle.json"):
        assert mode(bundle.directory / name) == 0o600, name
    assert sorted(p.name for p in store.directory.iterdir()) == ["current", "v000001"]
    assert (store.directory / "current").is_symlink()


def test_switch_keeps_the_previous_and_prunes_older(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    for n in (1, 2, 3):
        assert commit(store, n) == n
    assert store.current_version() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v000002", "v000003"]
    current = store.current()
    assert current is not None
    assert current.certificate_pem == cert(3)


def test_committing_the_current_certificate_again_is_a_no_op(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    assert commit(store, 1, key=KEY_PEM) == 1
    assert commit(store, 1, key=KEY_PEM) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v000001"]
    # The same certificate id with another endpoint is a new bundle.
    assert (
        store.commit(
            certificate_pem=cert(1),
            endpoint="other.example",
            certificate_id=f"{1:064x}",
            key_pem=KEY_PEM,
        )
        == 2
    )


def test_key_reference_instead_of_key_material(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    store.commit(
        certificate_pem=cert(1),
        endpoint="e.example",
        certificate_id="ab" * 32,
        key_reference="pkcs11:token=gw;object=ztp",
    )
    bundle = store.current()
    assert bundle is not None
    assert bundle.key_path is None
    assert bundle.key_reference == "pkcs11:token=gw;object=ztp"
    assert sorted(p.name for p in bundle.directory.iterdir()) == ["bundle.json", "certificate.pem"]


@pytest.mark.parametrize(
    "keys", [{}, {"key_pem": KEY_PEM, "key_reference": "pkcs11:x"}], ids=["neither", "both"]
)
def test_exactly_one_key_form(tmp_path: Path, keys: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        BundleStore(tmp_path).commit(
            certificate_pem=cert(1),
            endpoint="e.example",
            certificate_id="x",
            **keys,  # type: ignore[arg-type]
        )


def test_interrupted_commit_leaves_current_alone_and_is_swept(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    commit(store, 1)
    # What a kill in the middle of a commit leaves: a staging directory and a dangling new link.
    staging = tmp_path / ".staging-v000002-dead"
    staging.mkdir()
    (staging / "certificate.pem").write_text(cert(2))
    (tmp_path / ".current-dead").symlink_to("v000002")
    current = store.current()
    assert current is not None
    assert current.version == 1
    assert commit(store, 2) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v000001", "v000002"]


def test_damaged_pointer_or_bundle_is_a_storage_error(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    commit(store, 1)
    (tmp_path / "v000001" / "bundle.json").write_text("{not json")
    with pytest.raises(StorageError):
        store.current()
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to("elsewhere")
    with pytest.raises(StorageError, match="pointer"):
        store.current()


def test_readers_never_see_a_mix(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    commit(store, 1)
    done = threading.Event()
    seen: list[Bundle] = []
    errors: list[BaseException] = []

    def read() -> None:
        reader = BundleStore(tmp_path)
        try:
            while not done.is_set():
                bundle = reader.current()
                assert bundle is not None
                seen.append(bundle)
                n = bundle.version
                # Every part of one read comes from the same commit.
                assert bundle.certificate_pem == cert(n)
                assert bundle.endpoint == f"e{n}.iot.example"
                assert bundle.certificate_id == f"{n:064x}"
                assert bundle.key_path is not None
                try:
                    key = bundle.key_path.read_bytes()
                except FileNotFoundError:
                    # A Bundle hands out paths; the previous version is kept, so this one can
                    # only vanish once two newer commits have landed. The reader reads again.
                    newer = reader.current_version()
                    assert newer is not None
                    assert newer >= n + 2
                    continue
                assert key.endswith(f"#{n}".encode())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for n in range(2, 41):
            assert commit(store, n) == n
    finally:
        done.set()
        for thread in readers:
            thread.join()
    assert not errors, errors[0]
    assert len({b.version for b in seen}) > 1, "the readers never saw a switch"


def test_no_private_key_in_logs_or_repr(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    with capture_logs() as logs:
        commit(store, 1, key=KEY_PEM)
        commit(store, 1, key=KEY_PEM)
    bundle = store.current()
    rendered = repr(logs) + repr(bundle)
    assert "PRIVATE KEY" not in rendered
    assert KEY_PEM.decode().splitlines()[1][:30] not in rendered
    assert [e["event"] for e in logs] == ["bundle_committed", "bundle_already_current"]
