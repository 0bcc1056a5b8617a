"""The logging set-up: renderers, secret redaction, syslog over a real Unix socket, capture."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.contextvars import bound_contextvars
from structlog.testing import capture_logs

from shared.errors import UsageError
from shared.logs import (
    REDACTED,
    LogStyle,
    SecretRedactor,
    configure_logging,
    render_keyvalue,
    reset_logging,
)

PEM_KEY = (
    "-----BEGIN EC PRIVATE KEY-----\n"
    "MHcCAQEEIPEMSECRETPEMSECRETPEMSECRETxxxxxxxxxxxxxxxxxxoAoGCCqGSM49\n"
    "AwEHoUQDQgAEPEMSECRETtail\n"
    "-----END EC PRIVATE KEY-----\n"
)
PEM_MARKERS = ("PEMSECRET", "PEMSECRETtail", "MHcCAQEE")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    reset_logging()


def _log(style: LogStyle, emit: Callable[[Any], None]) -> str:
    out = io.StringIO()
    configure_logging(style=style, destination="stderr", ident="ztp", stream=out)
    emit(structlog.get_logger())
    return out.getvalue()


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _raise_and_log(message: str) -> Callable[[Any], None]:
    def emit(log: Any) -> None:
        try:
            _fail(message)
        except RuntimeError:
            log.exception("request failed")

    return emit


# (case name, how to log it, the secret texts that must not appear in the output)
SECRET_CASES: list[tuple[str, Callable[[Any], None], tuple[str, ...]]] = [
    ("password key", lambda log: log.info("login", password="hunter2-pw"), ("hunter2-pw",)),
    ("token key", lambda log: log.info("token", access_token="tok-AAA111"), ("tok-AAA111",)),
    (
        "client secret key",
        lambda log: log.info("oauth", client_secret="cs-BBB222"),
        ("cs-BBB222",),
    ),
    (
        "authorization header dict",
        lambda log: log.info("http", headers={"Authorization": "Bearer hdr-CCC333"}),
        ("hdr-CCC333",),
    ),
    ("private key key", lambda log: log.info("key", private_key=PEM_KEY), PEM_MARKERS),
    (
        "nested in dicts and lists",
        lambda log: log.info(
            "nested",
            request={"form": [{"user": "bob", "refreshToken": "rt-DDD444"}], "n": 1},
            items=[{"credentials": {"anything": "cred-EEE555"}}],
        ),
        ("rt-DDD444", "cred-EEE555"),
    ),
    (
        "password fragment in the message",
        lambda log: log.info("POST grant_type=password&username=sn1&password=pw-FFF666&x=1"),
        ("pw-FFF666",),
    ),
    (
        "bearer token in free text",
        lambda log: log.warning("retry", detail="sent Authorization: Bearer br-GGG777 got 401"),
        ("br-GGG777",),
    ),
    (
        "pem block in free text",
        lambda log: log.info("generated", note=f"key follows {PEM_KEY} end"),
        PEM_MARKERS,
    ),
    (
        "json fragment in free text",
        lambda log: log.info("body", body='{"client_secret": "js-HHH888", "grant": "x"}'),
        ("js-HHH888",),
    ),
    (
        "exception text",
        _raise_and_log(f"token=ex-III999 rejected; key {PEM_KEY}"),
        ("ex-III999", *PEM_MARKERS),
    ),
    (
        "exception object as a value",
        lambda log: log.error("failed", error=ValueError("passwd: ev-JJJ000")),
        ("ev-JJJ000",),
    ),
]


@pytest.mark.parametrize("style", ["keyvalue", "json"])
@pytest.mark.parametrize(
    ("emit", "secrets"),
    [pytest.param(emit, secrets, id=name) for name, emit, secrets in SECRET_CASES],
)
def test_secrets_are_masked_in_rendered_output(
    style: LogStyle, emit: Callable[[Any], None], secrets: tuple[str, ...]
) -> None:
    text = _log(style, emit)
    assert text.count("\n") == 1, text
    for secret in secrets:
        assert secret not in text
    assert REDACTED in text


def test_redaction_keeps_harmless_values_and_does_not_touch_caller_data() -> None:
    request = {"user": "bob", "password": "pw-KKK111"}
    text = _log("json", lambda log: log.info("login", request=request, tokens=3, key="a.b"))
    event = json.loads(text)
    assert event["request"] == {"user": "bob", "password": REDACTED}
    assert event["tokens"] == 3
    assert event["key"] == "a.b"
    assert request["password"] == "pw-KKK111"


def test_keyvalue_line_format() -> None:
    def emit(log: Any) -> None:
        log.info("cert delivered", zeta=1, alpha="two words", flag=True, none=None, empty="")
        log.info("multi", text='line1\nline2 "quoted"', data={"a": [1, 2]})

    lines = _log("keyvalue", emit).splitlines()
    assert len(lines) == 2
    first, second = lines
    assert "\x1b" not in first
    keys = [part.split("=", 1)[0] for part in first.split(" ") if "=" in part]
    assert keys[:3] == ["timestamp", "level", "event"]
    assert first.split(" ", 2)[2] == (
        'event="cert delivered" alpha="two words" empty="" flag=true none=null zeta=1'
    )
    assert first.startswith("timestamp=20")
    assert " level=info " in first
    assert second.endswith(r'data="{\"a\":[1,2]}" text="line1\nline2 \"quoted\""')


def test_keyvalue_escapes_every_line_breaking_character() -> None:
    line = render_keyvalue(None, "info", {"event": "a\u2028b\x85c\x01d\re"})
    assert line == r'event="a\u2028b\u0085c\x01d\re"'
    assert len(line.splitlines()) == 1


def test_render_keyvalue_orders_first_keys_even_when_bound_late() -> None:
    line = render_keyvalue(None, "info", {"b": 1, "event": "e", "a": "x", "level": "info"})
    assert line == "level=info event=e a=x b=1"


def test_json_lines_have_iso_timestamps_and_exception_as_string() -> None:
    text = _log("json", _raise_and_log("boom"))
    lines = text.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert list(event)[:3] == ["timestamp", "level", "event"]
    assert event["level"] == "error"
    stamp = dt.datetime.fromisoformat(event["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert isinstance(event["exception"], str)
    assert "RuntimeError: boom" in event["exception"]


def test_stdout_destination_writes_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(style="json", destination="stdout", ident="ztp-cloud")
    structlog.get_logger().info("started", shards=4)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["shards"] == 4


def test_contextvars_are_merged() -> None:
    def emit(log: Any) -> None:
        with bound_contextvars(device="SN42", shard="shardId-000"):
            log.info("fragment stored", index=3)
        log.info("after")

    first, second = _log("json", emit).splitlines()
    assert json.loads(first) | {"timestamp": None} == {
        "timestamp": None,
        "level": "info",
        "event": "fragment stored",
        "device": "SN42",
        "shard": "shardId-000",
        "index": 3,
    }
    assert "device" not in json.loads(second)


def test_level_filters_lower_events() -> None:
    out = io.StringIO()
    configure_logging(
        style="keyvalue", destination="stderr", ident="ztp", level="WARNING", stream=out
    )
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    assert out.getvalue().count("\n") == 1
    assert "event=w" in out.getvalue()


def test_configure_twice_replaces_the_setup() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(style="json", destination="stderr", ident="ztp", stream=first)
    structlog.get_logger().info("one")
    configure_logging(style="keyvalue", destination="stderr", ident="ztp", stream=second)
    structlog.get_logger().info("two")
    assert first.getvalue().count("\n") == 1
    assert second.getvalue().count("\n") == 1
    assert "event=two" in second.getvalue()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"style": "color"},
        {"destination": "file"},
        {"level": "verbose"},
        {"ident": ""},
        {"ident": "two words"},
    ],
)
def test_bad_arguments_raise_usage_error(kwargs: dict[str, str]) -> None:
    args: dict[str, Any] = {"style": "keyvalue", "destination": "stderr", "ident": "ztp"}
    with pytest.raises(UsageError):
        configure_logging(**(args | kwargs))


def test_capture_logs_sees_events_after_configure() -> None:
    configure_logging(style="keyvalue", destination="stderr", ident="ztp", stream=io.StringIO())
    log = structlog.get_logger()
    with capture_logs() as events, bound_contextvars(device="SN1"):
        log.info("csr published", attempt=2)
    assert events == [{"event": "csr published", "attempt": 2, "log_level": "info"}]


def test_capture_logs_works_with_cached_loggers() -> None:
    configure_logging(
        style="json", destination="stderr", ident="ztp", stream=io.StringIO(), cache_loggers=True
    )
    log = structlog.get_logger()
    log.info("warm the cache")
    with capture_logs() as events:
        log.warning("cached")
    assert events == [{"event": "cached", "log_level": "warning"}]


def test_stdlib_records_go_through_the_pipeline() -> None:
    out = io.StringIO()
    configure_logging(style="json", destination="stderr", ident="ztp", stream=out)
    configure_logging(style="json", destination="stderr", ident="ztp", stream=out)
    library = logging.getLogger("paho.client")
    library.debug("filtered out")
    library.warning("connection lost, password=%s", "lib-NNN444")
    try:
        _fail("handshake")
    except RuntimeError:
        library.exception("reconnect failed")
    library.log(25, "custom level")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["level"], e["event"], e["logger"]) for e in lines] == [
        ("warning", f"connection lost, password={REDACTED}", "paho.client"),
        ("error", "reconnect failed", "paho.client"),
        ("info", "custom level", "paho.client"),
    ]
    assert "RuntimeError: handshake" in lines[1]["exception"]
    assert "lib-NNN444" not in out.getvalue()


def test_reset_takes_the_bridge_off_the_root_logger() -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    configure_logging(style="json", destination="stderr", ident="ztp", stream=io.StringIO())
    assert len(root.handlers) == len(handlers) + 1
    reset_logging()
    assert (root.level, root.handlers) == (level, handlers)
    configure_logging(
        style="json",
        destination="stderr",
        ident="ztp",
        stream=io.StringIO(),
        capture_stdlib=False,
    )
    assert root.handlers == handlers


# --- syslog over a real Unix datagram socket -------------------------------------------------


@pytest.fixture
def syslog_server() -> Iterator[tuple[str, socket.socket]]:
    # A short directory: Unix socket paths are limited to ~107 bytes.
    with (
        tempfile.TemporaryDirectory(prefix="ztplog") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server,
    ):
        path = str(Path(directory) / "log")
        server.bind(path)
        server.settimeout(2.0)
        yield path, server


def test_syslog_destination_sends_ident_and_message(
    syslog_server: tuple[str, socket.socket],
) -> None:
    path, server = syslog_server
    actual = configure_logging(
        style="keyvalue", destination="syslog", ident="ztp", syslog_address=path
    )
    assert actual == "syslog"
    log = structlog.get_logger()
    log.info("key generated", device="SN7", password="sys-LLL222")
    log.warning("broker unreachable")

    first = server.recv(65536).decode()
    second = server.recv(65536).decode()
    # LOG_DAEMON (3) * 8 + info (6) = 30; + warning (4) = 28. syslogd stamps the time.
    assert first.rstrip("\x00") == (
        f'<30>ztp[{os.getpid()}]: level=info event="key generated" device=SN7 password={REDACTED}'
    )
    assert (
        second.rstrip("\x00") == f'<28>ztp[{os.getpid()}]: level=warning event="broker unreachable"'
    )
    assert "sys-LLL222" not in first


def test_syslog_reader_that_stalls_never_blocks_the_logger(
    syslog_server: tuple[str, socket.socket],
) -> None:
    path, server = syslog_server
    configure_logging(style="keyvalue", destination="syslog", ident="ztp", syslog_address=path)
    log = structlog.get_logger()
    # Nobody reads: the socket's queue fills after a few datagrams. A blocking send would hang
    # here (the whole daemon with it); the lines with no room are dropped and counted instead.
    for number in range(500):
        log.info("reading", number=number)
    queued = []
    server.settimeout(0.2)
    with contextlib.suppress(TimeoutError):
        while True:
            queued.append(server.recv(65536).decode())
    assert 0 < len(queued) < 500
    # Once there is room again, the first line through is followed by the count of lost ones.
    log.info("after the stall")
    after, report = server.recv(65536).decode(), server.recv(65536).decode()
    assert f"event=syslog.dropped count={500 - len(queued)}" in report
    assert 'event="after the stall"' in after


def test_syslog_configured_twice_sends_each_event_once(
    syslog_server: tuple[str, socket.socket],
) -> None:
    path, server = syslog_server
    configure_logging(style="json", destination="syslog", ident="ztp-cloud", syslog_address=path)
    configure_logging(style="json", destination="syslog", ident="ztp-cloud", syslog_address=path)
    structlog.get_logger().error("once")
    datagram = server.recv(65536).decode()
    assert datagram.startswith(f"<27>ztp-cloud[{os.getpid()}]: {{")
    assert json.loads(datagram.split(": ", 1)[1].rstrip("\x00"))["event"] == "once"
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.recv(65536)


def test_syslog_absent_falls_back_to_stderr_with_a_warning(tmp_path: Path) -> None:
    out = io.StringIO()
    actual = configure_logging(
        style="keyvalue",
        destination="syslog",
        ident="ztp",
        syslog_address=tmp_path / "missing",
        stream=out,
    )
    assert actual == "stderr"
    structlog.get_logger().info("still logged")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "level=warning" in lines[0]
    assert "syslog" in lines[0]
    assert str(tmp_path / "missing") in lines[0]
    assert 'event="still logged"' in lines[1]


# --- the redactor on its own -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("PASSWORD", True),
        ("db_password", True),
        ("AIRVANTAGE_PASSWORD_FILE", True),
        ("accessToken", True),
        ("x-api-key", True),
        ("Authorization", True),
        ("key_pem", True),
        ("client_secret", True),
        ("tokens", False),
        ("key", False),
        ("monkey", False),
        ("device", False),
        ("event", False),
    ],
)
def test_secret_key_matching(key: str, secret: bool) -> None:
    assert SecretRedactor().is_secret_key(key) is secret


@pytest.mark.parametrize(
    "text",
    [
        "basic checks passed",
        "issued 3 tokens",
        "grant_type=password&username=SN1",
        "key=airvantage.password reason=required",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    ],
)
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert SecretRedactor().scrub(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "client-secret: sep-OOO555",
        "X-Api-Key=sep-OOO555",
        "clientSecret='sep-OOO555'",
        "set PASSWD = sep-OOO555;",
        "auth ok, Bearer sep-OOO555",
        "AUTHORIZATION: Digest sep-OOO555",
    ],
)
def test_scrub_masks_separator_and_case_variants(text: str) -> None:
    scrubbed = SecretRedactor().scrub(text)
    assert "sep-OOO555" not in scrubbed
    assert REDACTED in scrubbed


def test_scrub_masks_basic_credentials_in_their_header() -> None:
    scrubbed = SecretRedactor().scrub("headers: {'Authorization': 'Basic dXNlcjpwYXNz'}")
    assert "dXNlcjpwYXNz" not in scrubbed


def test_secret_keys_are_extensible() -> None:
    redactor = SecretRedactor(secret_keys={"pin", "otp"})
    assert redactor.is_secret_key("sim_pin")
    assert not redactor.is_secret_key("password")
    assert redactor.scrub("pin=1234 ok") == f"pin={REDACTED} ok"
    out = io.StringIO()
    configure_logging(
        style="keyvalue", destination="stderr", ident="ztp", stream=out, extra_secret_keys={"pin"}
    )
    structlog.get_logger().info("unlock", sim_pin="9876", password="pw-MMM333")
    assert "9876" not in out.getvalue()
    assert "pw-MMM333" not in out.getvalue()


def test_redactor_needs_a_key() -> None:
    with pytest.raises(UsageError):
        SecretRedactor(secret_keys=())


def test_redactor_bounds_depth() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert "[redacted]" in repr(SecretRedactor().redact(loop))


# The secret holds a letter or digit and the filler none, so the secret can only leak through
# the assignment under test.
_SECRET_TEXT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._~+/-]{5,30}", fullmatch=True)
_FILLER = st.text(alphabet=" \t\n,;:{}[]()<>!?#*|&'\"", max_size=40)


@given(
    before=_FILLER,
    after=_FILLER,
    name=st.sampled_from(["password", "client_secret", "access_token", "api_key", "Token"]),
    sep=st.sampled_from(["=", ": ", '": "', "':'", " = "]),
    secret=_SECRET_TEXT,
)
def test_scrub_masks_assignments_anywhere(
    before: str, after: str, name: str, sep: str, secret: str
) -> None:
    scrubbed = SecretRedactor().scrub(f"{before} {name}{sep}{secret} {after}")
    assert secret not in scrubbed
    assert REDACTED in scrubbed
