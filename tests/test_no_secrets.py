"""The suite-wide secret guard (``tests/secret_guard.py``): it finds what it must, it spares what
it must, it fails a test or the run, and it never shows the secret it found.

Planted logs live in directories outside pytest's base temporary directory: the guard of this
very run scans that directory at the end, and the generic patterns planted here would fail it.
Secrets planted in the runs made with ``pytester`` are made up at run time and unknown to this
run's guard.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.secret_guard import (
    Finding,
    SecretRegistry,
    guard_of,
    private_key_needles,
    scan_log_files,
)

if TYPE_CHECKING:
    from sandbox.world import DeviceCredentials, Sandbox, SandboxThread

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# Learned by the guard when the suite's modules are collected (its name ends in SECRET).
_SELFTEST_SECRET = secrets.token_urlsafe(12)
_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_LATER = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def planted() -> Iterator[Path]:
    """A directory outside the base temporary directory, removed after the test."""
    with tempfile.TemporaryDirectory(prefix="ztp-secret-guard-") as directory:
        yield Path(directory)


def _password() -> str:
    return secrets.token_urlsafe(18)


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_texts(key: PrivateKey) -> list[str]:
    """What may be logged about a key: its public key, a CSR and a certificate, as PEM and as
    one-line base64 DER."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN0123456789")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_EPOCH)
        .not_valid_after(_LATER)
        .sign(key, hashes.SHA256())
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ders = [public, csr.public_bytes(serialization.Encoding.DER)]
    ders.append(cert.public_bytes(serialization.Encoding.DER))
    texts = [base64.b64encode(der).decode() for der in ders]
    texts += [
        csr.public_bytes(serialization.Encoding.PEM).decode(),
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    ]
    return texts


def _keys() -> list[PrivateKey]:
    return [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ]


# --------------------------------------------------------------------------------------------
# Matching


def test_a_registered_secret_is_found_wherever_it_sits() -> None:
    registry = SecretRegistry()
    secret = _password()
    registry.add(secret, kind="device password")
    for text in (
        secret,
        f"level=info event=connect password={secret}",
        json.dumps({"detail": f"login {secret} refused"}),
        f"GET /api/v1/systems?access_token={secret}&fields=uid",
        f"prefix{secret}suffix",  # glued to other run characters
        f"a/b/{secret}/c",
    ):
        assert registry.kinds_in(text) == {"device password"}, text


def test_a_secret_with_other_characters_is_found_too() -> None:
    registry = SecretRegistry()
    registry.add("p@ss w0rd!", kind="test password")
    assert registry.kinds_in("reason='p@ss w0rd!' rejected") == {"test password"}
    assert registry.kinds_in("p@ss w0rd") == set()


def test_clean_text_and_near_misses_are_not_findings() -> None:
    registry = SecretRegistry()
    secret = _password()
    registry.add(secret, kind="device password")
    for text in (
        "level=info event=connect serial=SN0123 password=[redacted]",
        secret[:-1],
        secret[1:],
        f"{secret[:12]} {secret[12:]}",  # split by a space
        "Authorization: Bearer [redacted]",
        'WWW-Authenticate: Bearer error="invalid_token"',
        '{"access_token": "[redacted]", "token_type": "bearer", "expires_in": 86400}',
        "-----BEGIN CERTIFICATE-----",
    ):
        assert registry.kinds_in(text) == set(), text


def test_generic_patterns_need_no_registration() -> None:
    registry = SecretRegistry()
    assert registry.kinds_in("sent Authorization: Bearer 3f2a9c0d1e4b5a6978f0e1d2c3b4a596") == {
        "Bearer token"
    }
    assert registry.kinds_in('key="-----BEGIN EC PRIVATE KEY-----\\nMHcCAQEE') == {
        "PEM private key block"
    }
    assert registry.kinds_in("-----BEGIN PRIVATE KEY-----") == {"PEM private key block"}


def test_short_secrets_are_refused_and_offers_of_them_ignored() -> None:
    registry = SecretRegistry()
    with pytest.raises(ValueError, match="at least 8"):
        registry.add("hunter2", kind="password")
    assert not registry.offer("hunter2", kind="password")
    assert not registry.offer(None, kind="password")
    assert registry.offer("hunter2-long", kind="password")
    assert "hunter2-long" in registry
    assert "hunter2" not in repr(registry)


def test_a_private_key_body_is_found_in_any_layout_its_public_parts_are_not() -> None:
    for key in _keys():
        registry = SecretRegistry()
        pem = _pem(key)
        assert registry.add_private_keys(pem) > 0
        body = "".join(pem.decode().splitlines()[1:-1])
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        lines = pem.decode().splitlines()[1:-1]
        layouts = {
            "as written": pem.decode(),
            "escaped in JSON": json.dumps({"key": pem.decode()}),
            "body without header, escaped": "\\n".join(lines),
            "body on one line": body,
            "DER in base64": base64.b64encode(der).decode(),
            "one private line": f"key={private_key_needles(pem)[-1]}",
        }
        name = type(key).__name__
        for layout, text in layouts.items():
            assert "private key" in registry.kinds_in(text), (name, layout)
        for number, text in enumerate(_public_texts(key)):
            assert registry.kinds_in(text) == set(), (name, number)


def test_private_key_needles_skip_public_lines_and_non_keys() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = _pem(key)
    needles = private_key_needles(pem)
    full_lines = [line for line in pem.decode().splitlines() if len(line) == 64]
    # P-384's body ends in its public key: some full lines are public and left out.
    assert 0 < len(needles) < len(full_lines)
    assert (
        private_key_needles(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----") == []
    )


def test_mask_hides_every_secret_and_names_its_kind() -> None:
    registry = SecretRegistry()
    secret = _password()
    registry.add(secret, kind="device password")
    text = f"a {secret} b Bearer 3f2a9c0d1e4b5a6978f0e1d2c3b4a596 c"
    masked = registry.mask(text)
    assert secret not in masked
    assert "3f2a9c0d" not in masked
    assert masked == "a [secret guard: device password] b [secret guard: Bearer token] c"


# --------------------------------------------------------------------------------------------
# Log files


def test_a_planted_log_is_reported_by_file_line_and_kind_never_by_value(planted: Path) -> None:
    registry = SecretRegistry()
    password, client_secret = _password(), secrets.token_urlsafe(24)
    registry.add(password, kind="device password")
    registry.add(client_secret, kind="AirVantage client secret")
    (planted / "daemon").mkdir()
    log = planted / "daemon" / "daemon.log"
    log.write_text(
        "level=info event=start\n"
        f"level=info event=connect password={password}\n"
        "level=info event=ok\n"
        f"level=debug event=token body=client_secret={client_secret}\n"
        "level=info event=auth header='Authorization: Bearer 0123456789abcdef0123'\n"
    )
    # Not a log: a secret in it is where it belongs.
    (planted / "daemon" / "config.toml").write_text(f'password = "{password}"\n')
    (planted / "clean.log").write_text("level=info event=nothing to see\n")

    findings = scan_log_files(planted, registry)

    assert findings == [
        Finding(str(log), "device password", 2),
        Finding(str(log), "AirVantage client secret", 4),
        Finding(str(log), "Bearer token", 5),
    ]
    report = "\n".join(finding.describe() for finding in findings)
    assert f"{log}:2: device password" in report
    assert password not in report
    assert client_secret not in report


def test_a_pem_key_in_a_log_is_reported(planted: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (planted / "moto.log").write_text("started\n" + _pem(key).decode())
    assert scan_log_files(planted, SecretRegistry()) == [
        Finding(str(planted / "moto.log"), "PEM private key block", 2)
    ]


def test_a_key_body_split_over_lines_without_its_header_is_reported(planted: Path) -> None:
    registry = SecretRegistry()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    registry.add_private_keys(_pem(key))
    body = _pem(key).decode().splitlines()[1:-1]
    (planted / "x.log").write_text("\n".join(body) + "\n")
    [finding] = scan_log_files(planted, registry)
    assert finding.kind == "private key"


def test_keys_and_descriptions_under_a_directory_are_learned(planted: Path) -> None:
    registry = SecretRegistry()
    key = ec.generate_private_key(ec.SECP256R1())
    (planted / "pki").mkdir()
    (planted / "pki" / "device.key").write_bytes(_pem(key))
    (planted / "pki" / "device.pem").write_text(_public_texts(key)[-2])  # a certificate
    password, client_secret = _password(), secrets.token_urlsafe(24)
    description = {
        "airvantage": {"client_secret": client_secret},
        "devices": [{"serial": "SBX1", "password": password}, {"serial": "SBX2"}],
    }
    (planted / "sandbox.json").write_text(json.dumps(description))
    (planted / "broken" / "sandbox.json").parent.mkdir()
    (planted / "broken" / "sandbox.json").write_text("{not json")

    assert registry.learn_private_keys(planted) == len(private_key_needles(_pem(key)))
    registry.learn_descriptions(planted)

    assert password in registry
    assert client_secret in registry
    assert registry.kinds_in(_pem(key).decode().splitlines()[1]) == {"private key"}


def test_secret_files_are_learned_by_name_mode_and_shape(planted: Path) -> None:
    registry = SecretRegistry()
    password, client_secret, other = _password(), _password(), _password()
    files = {
        "airvantage-password": (f"{password}\n", 0o600),  # learned
        "client-secret": (client_secret, 0o400),  # learned
        "token-readable": (other, 0o644),  # others may read it: not a secret file
        "state": (other, 0o600),  # not named as a secret
        "secret-notes": (f"{other} and more", 0o600),  # not one word
    }
    for name, (text, mode) in files.items():
        (planted / name).write_text(text)
        (planted / name).chmod(mode)

    assert registry.learn_secret_files(planted) == 2

    assert password in registry
    assert client_secret in registry
    assert other not in registry
    assert registry.kinds_in(password) == {"secret read from airvantage-password"}


def test_secret_constants_of_a_module_are_learned() -> None:
    module = types.ModuleType("tests.example")
    module.CLIENT_SECRET = "cloud-secret-8c1f"  # type: ignore[attr-defined]
    module.DEVICE_PASSWORD = "e2e-device-password-9a2c"  # type: ignore[attr-defined]
    module._ADMIN_TOKEN = "admin-token-77aa"  # type: ignore[attr-defined]
    module.TOKEN_PATH = "/api/oauth/token"  # type: ignore[attr-defined]  # not one word
    module.SHORT_SECRET = "pw"  # type: ignore[attr-defined]
    module.SECRET_KEYS = ("password", "token")  # type: ignore[attr-defined]
    module.TOKENS = "not-a-secret-name"  # type: ignore[attr-defined]
    registry = SecretRegistry()

    assert registry.learn_module_constants(module) == 3

    assert registry.kinds_in("x cloud-secret-8c1f y") == {"tests.example.CLIENT_SECRET"}
    assert "admin-token-77aa" in registry
    assert "not-a-secret-name" not in registry


def test_this_suites_secret_constants_were_learned(secret_registry: SecretRegistry) -> None:
    assert _SELFTEST_SECRET in secret_registry


# --------------------------------------------------------------------------------------------
# The plugin, in pytest runs of its own


Inner = Callable[..., pytest.RunResult]


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Inner:
    """Run a test module in a pytest run of its own, with the secret guard loaded."""
    # The installed plugins (asyncio, hypothesis) cost ~1 s a run and nothing inner needs them.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")

    def run(source: str, secret: str = "") -> pytest.RunResult:
        # The module builds SECRET from two halves, so no source line a report shows holds it.
        half = len(secret) // 2
        header = f"SECRET = {secret[:half]!r} + {secret[half:]!r}\n"
        pytester.makepyfile(test_inner=header + source)
        return pytester.runpytest_inprocess("-p", "tests.secret_guard")

    return run


def test_a_test_printing_a_registered_secret_fails_without_showing_it(inner: Inner) -> None:
    secret = _password()
    result = inner(
        """
def test_leaks(secret_registry):
    secret_registry.add(SECRET, kind="device password")
    print("connecting with", SECRET)

def test_clean():
    print("nothing secret here")
""",
        secret,
    )
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert "test_inner.py::test_leaks (captured stdout call): device password" in output
    assert "[secret guard: device password]" in output  # the captured section, masked
    assert secret not in output


def test_a_capture_logs_event_holding_a_secret_fails_the_test(inner: Inner) -> None:
    secret = _password()
    result = inner(
        """
import structlog
from structlog.testing import capture_logs

def test_logs_it(secret_registry):
    with capture_logs() as events:
        structlog.get_logger().info("token.fetched", detail=f"got {SECRET}")
    assert len(events) == 1
    # Learned after it was logged, as a token the sandbox issued is: still found.
    secret_registry.add(SECRET, kind="AirVantage token")
""",
        secret,
    )
    result.assert_outcomes(failed=1)
    assert "(capture_logs events, call): AirVantage token" in result.stdout.str()
    assert secret not in result.stdout.str()


def test_a_leak_in_a_failing_test_is_added_to_its_report(inner: Inner) -> None:
    secret = _password()
    result = inner(
        """
def test_fails(secret_registry):
    secret_registry.add(SECRET, kind="device password")
    print(SECRET)
    assert 1 == 2
""",
        secret,
    )
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "assert 1 == 2" in output
    assert "secret guard: a secret reached the logs of this test" in output
    assert secret not in output


def test_a_secret_in_an_exception_message_is_masked_in_the_report(inner: Inner) -> None:
    secret = _password()
    result = inner(
        """
def test_raises(secret_registry):
    secret_registry.add(SECRET, kind="device password")
    raise RuntimeError("login refused for " + SECRET)
""",
        secret,
    )
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "RuntimeError: login refused for [secret guard: device password]" in output
    assert "test_raises (failure report call): device password" in output
    assert secret not in output


def test_a_secret_in_a_log_file_fails_the_run_naming_file_and_kind(inner: Inner) -> None:
    secret = _password()
    result = inner(
        """
def test_writes_a_log(tmp_path, secret_registry):
    secret_registry.add(SECRET, kind="device password")
    (tmp_path / "daemon.log").write_text(f"start\\nlogin password={SECRET}\\n")
""",
        secret,
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str()
    assert "secret leaked: " in output
    assert "daemon.log:2: device password" in output
    assert secret not in output


def test_a_clean_run_passes(inner: Inner) -> None:
    result = inner(
        """
from structlog.testing import capture_logs
import structlog

def test_clean(tmp_path, secret_registry):
    secret_registry.add("a-secret-nobody-logs", kind="device password")
    (tmp_path / "daemon.log").write_text("level=info password=[redacted]\\n")
    with capture_logs() as events:
        structlog.get_logger().info("fine", password_set=True)
    print("Bearer [redacted]")
    assert events
""",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "secret guard" not in result.stdout.str()


# --------------------------------------------------------------------------------------------
# The session sandbox feeds the guard


async def _admin_password(world: Sandbox) -> str:
    return world.device_broker.admin_password


async def test_the_session_sandbox_tells_the_guard_its_secrets(
    sandbox: SandboxThread,
    sandbox_device: DeviceCredentials,
    secret_registry: SecretRegistry,
    pytestconfig: pytest.Config,
) -> None:
    description = sandbox.description
    access = description.airvantage
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{access.api_url}/api/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": access.client_id,
                "client_secret": access.client_secret,
            },
        ) as response,
    ):
        token = (await response.json())["access_token"]

    guard_of(pytestconfig).refresh()

    assert access.client_secret in secret_registry
    assert sandbox_device.password in secret_registry
    assert token in secret_registry
    assert await sandbox.run(_admin_password) in secret_registry
    pki_files = [path for path in (description.directory / "pki").iterdir() if path.is_file()]
    needles = [n for path in pki_files for n in private_key_needles(path.read_bytes())]
    assert needles
    assert all(needle in secret_registry for needle in needles)
