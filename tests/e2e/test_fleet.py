"""A fleet through the real processes: ``ztp-sandbox demo`` (one ``ztp-cloud``, N ``ztp-daemon``).

The process tests run the command a user runs, in a sandbox of its own (not the session's: the
demo owns its brokers, moto and emulator), and read its ``--json`` summary. The summary's
figures come from the peers themselves: the state files, the IoT broker (observer client) and
IoT's ListCertificates / ListThingPrincipals.

The pure parts of the demo (percentiles, failures, summary, progress text) are tested first,
without processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.demo import (
    LIVE_READINGS,
    DemoOptions,
    GatewayProgress,
    failures_of,
    percentile,
    render_progress,
    render_summary,
    summarize,
)
from sandbox.errors import SandboxUsageError

ROOT = Path(__file__).resolve().parents[2]

# --- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([], 0.5, None),
        ([3.0], 0.99, 3.0),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.0),
        ([float(v) for v in range(1, 101)], 0.99, 99.0),
        ([float(v) for v in range(1, 101)], 1.0, 100.0),
        ([float(v) for v in range(1, 11)], 0.99, 10.0),
    ],
)
def test_percentile_is_nearest_rank(
    values: list[float], fraction: float, expected: float | None
) -> None:
    assert percentile(values, fraction) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01])
def test_percentile_refuses_a_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(SandboxUsageError):
        percentile([1.0], fraction)


def test_options_refuse_bad_counts() -> None:
    with pytest.raises(SandboxUsageError, match="devices"):
        DemoOptions(devices=0)
    with pytest.raises(SandboxUsageError, match="crash"):
        DemoOptions(devices=2, crash=3)
    with pytest.raises(SandboxUsageError, match="positive"):
        DemoOptions(timeout=0)


def _done(serial: str, after: float, readings: int = 3) -> GatewayProgress:
    return GatewayProgress(
        live="ok",
        serial=serial,
        state="provisioned",
        attempts=1,
        fragments_sent=6,
        fragments_acked=6,
        messages=readings + 1,
        readings=readings,
        provisioned_after=after,
    )


def test_failures_name_each_gateway_and_why() -> None:
    progress = [
        _done("GW1", 1.0),
        GatewayProgress(
            serial="GW2", state="request_sent", attempts=2, last_error="certificate expired"
        ),
        GatewayProgress(serial="GW3", state="key_ready", exit_code=1),
        _done("GW4", 2.0, readings=1),
        GatewayProgress(serial="GW5", state="provisioned", readings=3, live="refused: outbox_full"),
    ]
    failures = failures_of(progress, messages=3, ended_by="the timeout of 60 s")
    assert [f.serial for f in failures] == ["GW2", "GW3", "GW4", "GW5"]
    reasons = {f.serial: f.reason for f in failures}
    assert reasons["GW2"].startswith("still request_sent (request sent 2x")
    assert "last error: certificate expired" in reasons["GW2"]
    assert reasons["GW2"].endswith("at the timeout of 60 s")
    assert reasons["GW3"].startswith("ztp-daemon exited with status 1 in state key_ready")
    assert reasons["GW4"].startswith("provisioned, but 1/3 readings reached IoT")
    assert reasons["GW5"].startswith("provisioned, but handing in a reading failed: refused")


def test_summary_counts_duplicates_and_latencies(tmp_path: Path) -> None:
    progress = [_done("GW1", 1.0), _done("GW2", 3.0), _done("GW3", 2.0)]
    summary = summarize(
        progress,
        messages=3,
        active_by_gateway={"GW1": 1, "GW2": 2, "GW3": 1},
        active_certificates=5,  # GW2's second one, and one attached to no gateway
        wall_seconds=4.0,
        ended_by=None,
        directory=tmp_path,
    )
    assert summary.provisioned == 3
    assert summary.duplicate_certificates == 2
    assert summary.provision_p50_seconds == 2.0
    assert summary.provision_p99_seconds == 3.0
    assert summary.messages_received == 12
    assert summary.readings_received == summary.messages_expected == 9
    assert [f.serial for f in summary.failures] == ["GW2"]
    assert summary.failures[0].reason == "provisioned, but 2 active certificates"
    assert not summary.ok
    shown = summary.to_json()
    for key in (
        "devices",
        "provisioned",
        "active_certificates",
        "duplicate_certificates",
        "messages_received",
        "wall_seconds",
        "provision_p50_seconds",
        "provision_p99_seconds",
        "failures",
    ):
        assert key in shown
    text = render_summary(summary)
    assert "FAILED: 3/3 gateways provisioned" in text
    assert "GW2: provisioned, but 2 active certificates" in text


def test_a_clean_run_is_ok_and_says_so(tmp_path: Path) -> None:
    progress = [_done("GW1", 1.0), _done("GW2", 1.5)]
    summary = summarize(
        progress,
        messages=3,
        active_by_gateway={"GW1": 1, "GW2": 1},
        active_certificates=2,
        wall_seconds=2.0,
        ended_by=None,
        directory=tmp_path,
    )
    assert summary.ok
    assert summary.failures == ()
    assert render_summary(summary).startswith("ztp demo ok: 2/2 gateways provisioned")


def test_progress_shows_each_gateway_and_sums_the_rest() -> None:
    progress = [
        _done("GW1", 1.0),
        GatewayProgress(serial="GW2", state="request_sent", fragments_sent=6, fragments_acked=0),
        GatewayProgress(serial="GW3"),
    ]
    text = render_progress(progress, elapsed=2.5, messages=3, rows=2)
    lines = text.splitlines()
    assert lines[0].split() == [
        "elapsed", "2.5", "s", "provisioned", "1/3", "readings", "at", "IoT", "3/9"
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["GW1", "provisioned", "6/6", "3/3"]
    assert lines[3].split()[:3] == ["GW2", "request_sent", "0/6"]
    assert lines[4].strip() == "... 1 more: 0 provisioned, 0 readings"


# --- the real processes -----------------------------------------------------------------------


def _demo(directory: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZTP_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "demo", "--json", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
    )


def _processes_under(directory: Path) -> list[str]:
    """Command lines of live processes naming ``directory`` (daemons, brokers, moto)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            status = (entry / "stat").read_text()
        except OSError:
            continue
        if status.rsplit(")", 1)[-1].split()[0] == "Z":
            continue  # a zombie is gone, only not yet reaped by its (unrelated) parent
        line = raw.replace(b"\x00", b" ").decode(errors="replace")
        if str(directory) in line:
            found.append(line)
    return found


def _summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(lines[0])
    return result


@pytest.mark.slow
def test_three_gateways_one_killed_mid_provisioning_all_provision_once(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    began = time.monotonic()
    done = _demo(directory, "--devices", "3", "--crash", "1", "--timeout", "45")
    took = time.monotonic() - began
    summary = _summary(done)
    assert done.returncode == 0, (summary, done.stderr)
    assert summary["devices"] == 3
    assert summary["provisioned"] == 3
    assert summary["failures"] == []
    # The killed gateway resumed with its key and request; the cloud issued no second
    # certificate for the request it saw twice.
    assert len(summary["restarted"]) == 1
    assert summary["active_certificates"] == 3
    assert summary["duplicate_certificates"] == 0
    # Three queued in each outbox before the start, one handed to each ingestion socket after.
    assert summary["readings_received"] == summary["messages_expected"] == 3 * (3 + LIVE_READINGS)
    assert summary["messages_received"] >= summary["readings_received"]
    assert 0 < summary["provision_p50_seconds"] <= summary["provision_p99_seconds"]
    assert summary["provision_p99_seconds"] <= summary["wall_seconds"]
    [restarted] = summary["restarted"]
    log = (directory / f"gw-{restarted}" / "daemon.log").read_text()
    assert log.count("event=provisioning.state") > 0
    assert "state=provisioned" in log
    # Everything the demo started has stopped; the secrets stayed out of its output.
    assert _processes_under(directory) == []
    logs = [directory / "demo.log", directory / "cloud" / "cloud.log"]
    logs += directory.glob("gw-*/daemon.log")
    for path in logs:
        assert "PRIVATE KEY" not in path.read_text(), path
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    assert took < 60


@pytest.mark.slow
def test_a_run_that_times_out_exits_1_naming_every_gateway(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    done = _demo(directory, "--devices", "2", "--timeout", "0.2")
    summary = _summary(done)
    assert done.returncode == 1
    assert summary["provisioned"] < 2
    failed = {f["serial"]: f["reason"] for f in summary["failures"]}
    assert len(failed) == 2 - summary["provisioned"]
    for reason in failed.values():
        assert reason.startswith("still ")
        assert reason.endswith("at the timeout of 0.2 s")
    assert _processes_under(directory) == []


@pytest.mark.slow
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZTP_", "AWS_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "demo", "--dir", str(directory), "--devices", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    try:
        # Interrupt once the gateways run: their first state line is printed.
        assert process.stdout is not None
        seen = ""
        deadline = time.monotonic() + 30
        while " fresh" not in seen and time.monotonic() < deadline:
            seen += process.stdout.readline()
        assert " fresh" in seen, seen
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, err
    assert "INTERRUPTED" in seen + out
    assert _processes_under(directory) == []
