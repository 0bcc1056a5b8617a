"""The state file on a real file system: round trips, modes, refusal of damage, SIGKILL safety."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.errors import StorageError
from ztp_daemon.machine import State, StateRecord, request_id_for
from ztp_daemon.state import StateFile, record_to_json

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
