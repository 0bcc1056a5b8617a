"""The supervisor's part in a renewal: a fresh key, never the one of the bundle in use.

The supervisor performs the machine's ``MakeKey(fresh=True)`` against a real file key store in a
temporary directory; no link is opened (the action does not use it).
"""

from __future__ import annotations

import random
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.config import Secret
from ztp_daemon.bundle import BundleStore
from ztp_daemon.csr import CsrSubject
from ztp_daemon.keystore import FileKeyStore
from ztp_daemon.link import LinkSettings
from ztp_daemon.machine import (
    KeyReady,
    MachineConfig,
    MakeKey,
    ProvisioningMachine,
    SharedCodecDecoder,
)
from ztp_daemon.state import StateFile
from ztp_daemon.supervisor import Supervisor

SERIAL = "SN-SUPERVISOR-RENEW"


def supervisor(directory: Path, keystore: FileKeyStore) -> Supervisor:
    machine = ProvisioningMachine(
        MachineConfig(serial=SERIAL), decoder=SharedCodecDecoder(), rng=random.Random(1)
    )
    return Supervisor(
        machine=machine,
        serial=SERIAL,
        subject=CsrSubject(SERIAL),
        keystore=keystore,
        state_file=StateFile(directory),
        bundles=BundleStore(directory / "bundles"),
        link_settings=LinkSettings(
            serial=SERIAL, password=Secret("pw-unused"), host="127.0.0.1", tls=False, port=1
        ),
    )


def spki(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_a_fresh_key_replaces_a_leftover_pending_key(tmp_path: Path) -> None:
    keystore = FileKeyStore(tmp_path)
    # A pending key left behind (a discard that failed): it is the key of the bundle in use.
    leftover = keystore.load_or_create()
    driver = supervisor(tmp_path, keystore)

    again = await driver._perform(MakeKey())
    assert isinstance(again, KeyReady)
    assert spki(again.public_key) == spki(leftover.public_key)  # first provisioning: reused

    fresh = await driver._perform(MakeKey(fresh=True))
    assert isinstance(fresh, KeyReady)
    assert spki(fresh.public_key) != spki(leftover.public_key)
    stored = keystore.load()
    assert stored is not None
    assert spki(stored.public_key) == spki(fresh.public_key)
    csr = x509.load_pem_x509_csr(fresh.csr_pem.encode())
    assert csr.subject.rfc4514_string() == f"CN={SERIAL}"
