"""The state file on a real file system: round trips, modes, refusal of damage, SIGKILL safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections import deque
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.pki import SandboxPki
from shared.messages import CertificateDelivery, delivery_params
from ztp_daemon.bundle import BundleStore
from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.errors import StorageError
from ztp_daemon.keystore import FileKeyStore
from ztp_daemon.machine import (
    DELIVER_COMMAND,
    AckTask,
    Action,
    CancelRetry,
    CredentialsStored,
    DiscardKey,
    Input,
    KeyReady,
    LinkUp,
    MachineConfig,
    MakeKey,
    Persist,
    Persisted,
    ProvisioningMachine,
    PublishRequest,
    ReportStatus,
    ScheduleRetry,
    SharedCodecDecoder,
    Start,
    StartPublisher,
    State,
    StateRecord,
    StoreCredentials,
    TaskReceived,
    TimerFired,
    request_id_for,
)
from ztp_daemon.state import StateFile, record_to_json
from ztp_daemon.verify import VerifyPolicy, public_key_der

REPO = Path(__file__).resolve().parents[2]
CSR = build_csr(ec.generate_private_key(ec.SECP256R1()), CsrSubject("SN-STATE"))
RID = request_id_for(CSR)

RECORDS = [
    StateRecord(State.KEY_READY, RID, CSR),
    StateRecord(State.REQUEST_SENT, RID, CSR, attempts=3),
    StateRecord(
        State.WAITING_RETRY, RID, CSR, attempts=2, next_retry_at=1.78e9 + 0.5, last_error="e"
    ),
    StateRecord(State.PROVISIONED, RID, CSR, attempts=1, bundle_version=4, certificate_id="a" * 64),
]


@pytest.mark.parametrize("record", RECORDS, ids=[r.state.value for r in RECORDS])
def test_round_trip_and_modes(tmp_path: Path, record: StateRecord) -> None:
    directory = tmp_path / "var" / "lib" / "ztp"
    store = StateFile(directory)
    assert store.load() is None
    store.save(record)
    assert StateFile(directory).load() == record
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == ["state.json"]


def test_save_replaces(tmp_path: Path) -> None:
    store = StateFile(tmp_path)
    for record in RECORDS:
        store.save(record)
    assert store.load() == RECORDS[-1]


def _document(**changes: object) -> bytes:
    document = json.loads(record_to_json(RECORDS[2]))
    document.update(changes)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b"\xff\xfe",
        _document(format=2),
        _document(state="storing"),
        _document(state="nonsense"),
        _document(attempts="3"),
        _document(attempts=True),
        _document(next_retry_at=None),
        _document(request_id=None),
        _document(bundle_version=1.5),
        # A status report could not carry these: AWS IoT ids are 64 lowercase hex digits.
        _document(state="provisioned", bundle_version=1, certificate_id="cert-1"),
        _document(state="provisioned", bundle_version=1, certificate_id="A" * 64),
    ],
)
def test_damaged_state_is_a_storage_error(tmp_path: Path, content: bytes) -> None:
    store = StateFile(tmp_path)
    store.path.write_bytes(content)
    with pytest.raises(StorageError) as caught:
        store.load()
    assert caught.value.operation == "parse"


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ztp_daemon.machine import State, StateRecord
    from ztp_daemon.state import StateFile

    csr = Path(sys.argv[2]).read_text()
    store = StateFile(Path(sys.argv[1]))
    rid = sys.argv[3]
    attempts = 0
    print("ready", flush=True)
    while True:
        attempts += 1
        store.save(StateRecord(State.REQUEST_SENT, rid, csr, attempts=attempts,
                               last_error="x" * (attempts % 5000)))
    """
)


def test_sigkill_during_writes_leaves_a_readable_record(tmp_path: Path) -> None:
    csr_file = tmp_path / "csr.pem"
    csr_file.write_text(CSR)
    directory = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen: list[int] = []
    for delay in (0.15, 0.3, 0.45):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(directory), str(csr_file), RID],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        record = StateFile(directory).load()
        assert record is not None
        assert record.state is State.REQUEST_SENT
        assert record.last_error == "x" * (record.attempts % 5000)
        seen.append(record.attempts)
    assert all(n > 0 for n in seen)
    # The next save sweeps temporary files a kill left behind.
    StateFile(directory).save(RECORDS[0])
    assert [p.name for p in directory.iterdir()] == ["state.json"]


# --- killed between any two actions, restarted: same key, same CSR, one bundle ----------------


class SimulatedKillError(Exception):
    """The simulated kill: no further action of this run is performed."""


class MiniDriver:
    """A synchronous stand-in for the async driver, over the real stores and a fake cloud.

    It performs actions in order and feeds each storage completion before anything else, as
    the machine's contract asks. ``budget`` is how many actions it performs before it "dies".
    """

    def __init__(self, root: Path, pki: SandboxPki, *, budget: int | None = None) -> None:
        self.state = StateFile(root / "state")
        self.keys = FileKeyStore(root / "state")
        self.bundles = BundleStore(root / "state" / "bundles")
        self.pki = pki
        self.budget = budget
        self.performed = 0
        self.published: list[str] = []
        self.key_ready_keys: list[bytes] = []
        self.started_publisher = False
        config = MachineConfig(serial="SN-KILL", verify=VerifyPolicy(trust_anchors=(pki.ca_cert,)))
        self.machine = ProvisioningMachine(
            config,
            decoder=SharedCodecDecoder(),
            rng=random.Random(0),
            record=self.state.load(),
        )
        self.timer = False
        self.queue: deque[Input] = deque([LinkUp(), Start()])

    def cloud_answer(self, csr_pem: str, request_id: str) -> TaskReceived:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        # Idempotent like the cloud's ledger: one certificate per request id.
        cert = _CLOUD.setdefault(request_id, self.pki.sign(csr.public_key(), csr.subject))
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        cid = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        delivery = CertificateDelivery(request_id, cid, "localhost", pem)
        params = delivery_params(delivery, transfer_id=request_id[:16])
        return TaskReceived(f"task-{request_id[:8]}", DELIVER_COMMAND, params)

    def perform(self, action: Action) -> None:
        if self.budget is not None and self.performed >= self.budget:
            raise SimulatedKillError
        self.performed += 1
        match action:
            case MakeKey():
                handle = self.keys.load_or_create()
                self.key_ready_keys.append(public_key_der(handle.public_key))
                self.queue.appendleft(KeyReady(handle.sign_csr(CsrSubject("SN-KILL"))))
            case Persist(record=record):
                self.state.save(record)
                self.queue.appendleft(Persisted())
            case PublishRequest(request_id=rid, csr_pem=csr):
                self.published.append(csr)
                self.queue.append(self.cloud_answer(csr, rid))
            case StoreCredentials() as store:
                handle = self.keys.load()
                assert handle is not None, "the key went missing before the bundle held it"
                version = self.bundles.commit(
                    certificate_pem=store.certificate_pem,
                    endpoint=store.endpoint,
                    certificate_id=store.certificate_id,
                    key_pem=handle.private_key_pem(),
                )
                self.queue.appendleft(CredentialsStored(version))
            case DiscardKey():
                self.keys.discard()
            case ScheduleRetry():
                self.timer = True
            case CancelRetry():
                self.timer = False
            case StartPublisher():
                self.started_publisher = True
            case AckTask() | ReportStatus():
                pass

    def run(self) -> None:
        for _ in range(200):
            if not self.queue:
                if self.started_publisher or not self.timer:
                    return
                self.timer = False
                self.queue.append(TimerFired())
            for action in self.machine.handle(self.queue.popleft(), now=time.time()):
                self.perform(action)
        raise AssertionError("the driver did not settle")


_CLOUD: dict[str, x509.Certificate] = {}


def test_killed_between_any_two_actions_then_restarted(tmp_path: Path) -> None:
    pki = SandboxPki.load_or_create(tmp_path / "pki")
    whole = MiniDriver(tmp_path / "whole", pki)
    whole.run()
    assert whole.started_publisher
    total = whole.performed
    assert total > 10
    for budget in range(total):
        root = tmp_path / f"kill-{budget}"
        first = MiniDriver(root, pki, budget=budget)
        with pytest.raises(SimulatedKillError):
            first.run()
        second = MiniDriver(root, pki)
        second.run()
        assert second.started_publisher, budget
        # Same key: every KeyReady in both lives came from one key.
        keys = set(first.key_ready_keys + second.key_ready_keys)
        assert len(keys) <= 1, budget
        # Same CSR: everything ever published is one CSR.
        published = set(first.published + second.published)
        assert len(published) == 1, budget
        # One bundle, holding that key, and the record says provisioned with it.
        versions = sorted(p.name for p in (root / "state" / "bundles").glob("v*"))
        assert versions == ["v000001"], budget
        bundle = second.bundles.current()
        assert bundle is not None
        assert bundle.key_path is not None
        key = serialization.load_pem_private_key(bundle.key_path.read_bytes(), password=None)
        csr = x509.load_pem_x509_csr(published.pop().encode())
        assert public_key_der(key.public_key()) == public_key_der(csr.public_key()), budget
        final = second.state.load()
        assert final is not None
        assert final.state is State.PROVISIONED
        assert final.bundle_version == 1
        # The pending key is gone once the bundle holds it.
        assert second.keys.load() is None
        assert stat.S_IMODE(bundle.key_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(bundle.directory.stat().st_mode) == 0o700
