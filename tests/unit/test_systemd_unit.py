"""The device daemon's systemd unit: systemd's own verifier, its directives, its sandbox."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from shared.config import env_names
from ztp_daemon.config import DEFAULT_CONFIG_PATH, ENV_PREFIX, DeviceConfig, load_device_config
from ztp_daemon.state import DEFAULT_STATE_DIRECTORY

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "ztp-daemon.service"
EXEC_START = "/opt/ztp/bin/ztp-daemon run --config /etc/ztp/ztp.toml"
# systemd-analyze ships in the `systemd` package; the test needs no running systemd (PID 1).
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """A unit file as systemd reads it: sections of (key, value) pairs, repeats kept in order."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1].rstrip() + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= appears {len(found)} times"
    return found[0]


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def _verifiable_copy(directory: Path) -> Path:
    """The unit with its ExecStart binary pointed at a stub that exists here.

    ``systemd-analyze verify`` refuses a unit whose binary is missing, and /opt/ztp is made only
    by installing on a gateway; every other line is verified as shipped.
    """
    stub = directory / "ztp-daemon"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert text.count("ExecStart=/opt/ztp/bin/ztp-daemon ") == 1
    copy = directory / UNIT.name
    copy.write_text(
        text.replace("ExecStart=/opt/ztp/bin/ztp-daemon ", f"ExecStart={stub} "), encoding="utf-8"
    )
    return copy


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    # SYSTEMD_LOG_LEVEL keeps notices out; warnings (an unknown key, a bad value) still print.
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_systemd_analyze_verify_passes_without_a_word(tmp_path: Path) -> None:
    result = _analyze("verify", "--man=no", str(_verifiable_copy(tmp_path)))
    # verify exits 0 on an unknown directive and only warns, so silence is the pass condition.
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


def test_verify_catches_a_bad_directive(tmp_path: Path) -> None:
    # The check above can fail: a misspelt key is reported.
    copy = _verifiable_copy(tmp_path)
    copy.write_text(
        copy.read_text().replace("NotifyAccess=main", "NotifyAcess=main"), encoding="utf-8"
    )
    result = _analyze("verify", "--man=no", str(copy))
    assert "NotifyAcess" in result.stderr


def test_exposure_score_is_low(tmp_path: Path) -> None:
    # systemd's own rating of the sandbox, 0 (locked down) to 10 (exposed); 1.4 when written.
    result = _analyze("security", "--offline=true", "--no-pager", str(_verifiable_copy(tmp_path)))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for ztp-daemon\.service: (\d+\.\d)", result.stdout)
    assert match is not None, result.stdout[-500:]
    assert float(match.group(1)) <= 2.0


def test_notify_and_restart(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "Restart") == "on-failure"
    watchdog = one(unit, "Service", "WatchdogSec")
    assert watchdog.endswith("s")
    assert 20 <= int(watchdog[:-1]) <= 300
    assert one(unit, "Service", "ExecStart") == EXEC_START
    assert "network-online.target" in one(unit, "Unit", "After").split()
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_exec_start_is_the_installed_console_script(unit: Unit) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    binary = Path(one(unit, "Service", "ExecStart").split()[0])
    assert binary.name in scripts
    assert scripts[binary.name].startswith("ztp_daemon.")


def test_files_user_and_logs(unit: Unit) -> None:
    assert one(unit, "Service", "DynamicUser") == "yes"
    assert one(unit, "Service", "StateDirectory") == "ztp"
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    assert one(unit, "Service", "ConfigurationDirectory") == "ztp"
    assert one(unit, "Service", "UMask") == "0077"
    assert one(unit, "Service", "SyslogIdentifier") == "ztp"
    assert EXEC_START.endswith("/etc/ztp/ztp.toml")  # inside ConfigurationDirectory=ztp


def test_ingestion_socket_lives_in_the_runtime_directory(unit: Unit) -> None:
    # /run is read-only under ProtectSystem=strict but for RuntimeDirectory=; the group may
    # traverse it (0750) to reach the 0660 socket, the world may not.
    assert one(unit, "Service", "RuntimeDirectory") == "ztp"
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0750"
    assert one(unit, "Service", "Group") == "ztp-ingest"
    environment = dict(
        item.split("=", 1)
        for line in values(unit, "Service", "Environment")
        for item in line.split()
    )
    assert environment["ZTP_PUBLISHER_INGEST_SOCKET"] == "%t/ztp/ingest.sock"


def test_password_arrives_as_a_credential(unit: Unit) -> None:
    name, _, source = one(unit, "Service", "LoadCredential").partition(":")
    assert name == "airvantage-password"
    assert source == "/etc/ztp/airvantage-password"
    environment = dict(
        item.split("=", 1)
        for line in values(unit, "Service", "Environment")
        for item in line.split()
    )
    assert environment["ZTP_AIRVANTAGE_PASSWORD_FILE"] == f"%d/{name}"
    # The password itself never sits in the unit, where `systemctl show` would print it.
    assert not any(key == "ZTP_AIRVANTAGE_PASSWORD" for key in environment)
    assert values(unit, "Service", "SetCredential") == []


def test_unit_agrees_with_the_device_configuration(unit: Unit) -> None:
    # load_config refuses an unknown ZTP_* variable, so a stale name would stop the daemon.
    known = env_names(DeviceConfig, env_prefix=ENV_PREFIX)
    for line in values(unit, "Service", "Environment"):
        for item in line.split():
            name = item.split("=", 1)[0]
            assert name in known, f"Environment={name}: no configuration key reads it"
    assert known["ZTP_AIRVANTAGE_PASSWORD_FILE"] == "airvantage.password"
    assert one(unit, "Service", "ExecStart").endswith(f"--config {DEFAULT_CONFIG_PATH}")
    assert Path("/var/lib") / one(unit, "Service", "StateDirectory") == DEFAULT_STATE_DIRECTORY
    assert DEFAULT_CONFIG_PATH.parent == Path("/etc") / one(
        unit, "Service", "ConfigurationDirectory"
    )


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
    ],
)
def test_hardening(unit: Unit, key: str, expected: str) -> None:
    assert one(unit, "Service", key) == expected


def test_network_and_system_calls(unit: Unit) -> None:
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters[0] == "@system-service"
    assert all(f.startswith("~") for f in filters[1:]), "later lines may only take away"


def test_parser_reads_continuations_and_repeats() -> None:
    parsed = parse_unit("[A]\n# c\nX=1\nX=2 \\\n  3\n[B]\nY=\n")
    assert parsed == {"A": [("X", "1"), ("X", "2 3")], "B": [("Y", "")]}


_MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, mmap, pkgutil, importlib, sqlite3, ssl, asyncio
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: the kernel's own MemoryDenyWriteExecute.
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl failed: errno {ctypes.get_errno()}")
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        raise SystemExit("writable executable memory was still allowed")
    import shared, ztp_daemon
    for package in (shared, ztp_daemon):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__"):
                importlib.import_module(info.name)
    import aiomqtt, structlog
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    ec.generate_private_key(ec.SECP256R1())
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    db = sqlite3.connect(":memory:")
    db.execute("create table t (x)")
    db.executemany("insert into t values (?)", [(i,) for i in range(100)])
    ssl.create_default_context()
    asyncio.run(asyncio.sleep(0))
    print("ok")
    """
)


def test_python_runs_under_memory_deny_write_execute() -> None:
    # MemoryDenyWriteExecute=yes kills a process that maps writable code (a JIT, libffi
    # closures). The kernel's PR_SET_MDWE enforces the same rule in a child process.
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_the_guides_configuration_example_loads(tmp_path: Path) -> None:
    # docs/operations.md shows /etc/ztp/ztp.toml; it must be a configuration the daemon accepts,
    # with the password coming from the credential file the unit names.
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    start = guide.index("### Configuration: /etc/ztp/ztp.toml")
    example = guide[start:].split("```toml\n", 1)[1].split("```", 1)[0]
    config_file = tmp_path / "ztp.toml"
    config_file.write_text(example, encoding="utf-8")
    password = tmp_path / "airvantage-password"
    password.write_text("not-the-real-one\n", encoding="utf-8")
    config = load_device_config(config_file, {"ZTP_AIRVANTAGE_PASSWORD_FILE": str(password)})
    assert config.airvantage.password.reveal() == "not-the-real-one"
    assert config.device.state_dir == DEFAULT_STATE_DIRECTORY
    assert config.log.destination.value == "syslog"
