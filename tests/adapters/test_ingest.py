"""Local ingestion: the line splitter and request decoder, then the real Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import UsageError
from ztp_daemon.ingest import (
    IngestConfig,
    IngestServer,
    LineSplitter,
    Overlong,
    RequestError,
    TopicForbiddenError,
    error_reply,
    ok_reply,
    parse_request,
)
from ztp_daemon.outbox import Outbox, OutboxLimits, OverflowPolicy, TopicError

THING = "gw-42"
PREFIXES = (f"dt/{THING}/",)


# -- the line splitter -------------------------------------------------------------------------


def test_splitter_handles_lines_across_chunks() -> None:
    splitter = LineSplitter(100)
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.feed(b":2}\n\n") == [b'{"b":2}', b""]
    assert splitter.feed(b"tail") == []
    assert splitter.end() == [b"tail"]
    assert splitter.end() == []


def test_splitter_discards_an_overlong_line_once_and_recovers() -> None:
    splitter = LineSplitter(10)
    assert splitter.feed(b"x" * 8) == []
    assert splitter.feed(b"y" * 8) == []
    assert splitter.feed(b"z" * 30) == []
    assert splitter.feed(b"zz\nok\n") == [Overlong(48), b"ok"]
    assert splitter.feed(b"a" * 10 + b"\n" + b"b" * 11 + b"\n") == [b"a" * 10, Overlong(11)]


def test_splitter_reports_an_overlong_last_line_at_the_end() -> None:
    splitter = LineSplitter(4)
    assert splitter.feed(b"123456") == []
    assert splitter.end() == [Overlong(6)]


@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    cuts=st.lists(st.integers(0, 1000), max_size=10),
)
def test_splitter_output_does_not_depend_on_chunking(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    expected = [line if len(line) <= 20 else Overlong(len(line)) for line in lines]
    splitter = LineSplitter(20)
    got: list[bytes | Overlong] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        got += splitter.feed(stream[start:cut])
        start = cut
    got += splitter.end()
    assert got == expected


# -- request decoding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        ("21.5 C", b"21.5 C"),
        ({"celsius": 21.5, "ok": True}, b'{"celsius":21.5,"ok":true}'),
        ([1, 2], b"[1,2]"),
        (None, b"null"),
        ("é", "é".encode()),
    ],
)
def test_parse_request_encodes_payloads(payload: Any, wire: bytes) -> None:
    line = json.dumps({"topic": f"dt/{THING}/t", "payload": payload, "qos": 1}).encode()
    request = parse_request(line, PREFIXES)
    assert (request.topic, request.payload) == (f"dt/{THING}/t", wire)


def test_qos_defaults_to_one() -> None:
    assert parse_request(b'{"topic": "dt/gw-42/x", "payload": 1}', PREFIXES).payload == b"1"


@pytest.mark.parametrize(
    ("line", "error", "code"),
    [
        (b"not json", RequestError, "malformed_json"),
        (b'{"topic": "dt/gw-42/x", "payload": 1', RequestError, "malformed_json"),
        (b"\xff\xfe", RequestError, "malformed_json"),
        (b"[" * 100_000 + b"]" * 100_000, RequestError, "malformed_json"),
        (b"[1, 2]", RequestError, "bad_request"),
        (b'{"payload": 1}', RequestError, "bad_request"),
        (b'{"topic": 7, "payload": 1}', RequestError, "bad_request"),
        (b'{"topic": "dt/gw-42/x"}', RequestError, "bad_request"),
        (b'{"topic": "dt/gw-42/x", "payload": 1, "qos": 0}', RequestError, "bad_request"),
        (b'{"topic": "dt/gw-42/x", "payload": 1, "qos": true}', RequestError, "bad_request"),
        (b'{"topic": "dt/gw-42/x", "payload": 1, "retain": true}', RequestError, "bad_request"),
        (b'{"topic": "dt/gw-42/#", "payload": 1}', TopicError, "topic_invalid"),
        (b'{"topic": "dt/other/x", "payload": 1}', TopicForbiddenError, "topic_forbidden"),
        (b'{"topic": "dt/gw-42", "payload": 1}', TopicForbiddenError, "topic_forbidden"),
        (b'{"topic": "dt/gw-42/", "payload": 1}', TopicForbiddenError, "topic_forbidden"),
        (b'{"topic": "dt/gw-420/x", "payload": 1}', TopicForbiddenError, "topic_forbidden"),
        (b'{"topic": "cmd/gw-42/x", "payload": 1}', TopicForbiddenError, "topic_forbidden"),
        (b'{"topic": "dt/gw-42/\\ud800", "payload": 1}', TopicError, "topic_invalid"),
        (b'{"topic": "dt/gw-42/x", "payload": "\\ud800"}', RequestError, "bad_request"),
        (b'{"topic": "dt/gw-42/x", "payload": ["\\udfff"]}', RequestError, "bad_request"),
    ],
)
def test_bad_requests_raise_and_map_to_stable_codes(
    line: bytes, error: type[Exception], code: str
) -> None:
    with pytest.raises(error) as caught:
        parse_request(line, PREFIXES)
    reply = json.loads(error_reply(caught.value))
    assert reply["ok"] is False
    assert reply["error"] == code
    assert reply["detail"]


def test_replies_are_single_json_lines() -> None:
    assert json.loads(ok_reply("abc-1")) == {"ok": True, "id": "abc-1"}
    assert ok_reply("abc-1").count(b"\n") == 1
    assert json.loads(error_reply(Overlong(99)))["error"] == "line_too_long"
    assert json.loads(error_reply(RuntimeError("x")))["error"] == "unavailable"


@pytest.mark.parametrize(
    "overrides",
    [
        {"allowed_prefixes": ()},
        {"allowed_prefixes": ("dt/gw",)},
        {"allowed_prefixes": ("dt/+/",)},
        {"mode": 0o1777},
        {"max_line_bytes": 10},
        {"socket_path": Path("/tmp/" + "s" * 120)},
    ],
)
def test_config_validates_when_built(overrides: dict[str, Any]) -> None:
    values: dict[str, Any] = {"socket_path": Path("/tmp/x.sock"), "allowed_prefixes": PREFIXES}
    values.update(overrides)
    with pytest.raises(UsageError):
        IngestConfig(**values)


def test_config_for_thing() -> None:
    config = IngestConfig.for_thing(Path("/tmp/x.sock"), THING)
    assert config.allowed_prefixes == PREFIXES
    assert config.mode == 0o660


# -- the real socket ---------------------------------------------------------------------------


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    # AF_UNIX paths are short; pytest's tmp_path may be too long for one.
    short = Path("/tmp") / f"ztp-ingest-{tmp_path.name[-20:]}.sock"
    yield short
    short.unlink(missing_ok=True)


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.db") as opened:
        yield opened


class Client:
    """A producer on the ingestion socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def send(self, *lines: bytes) -> list[dict[str, Any]]:
        self.writer.write(b"".join(line + b"\n" for line in lines))
        await self.writer.drain()
        return [await self.reply() for _ in lines]

    async def reply(self) -> dict[str, Any]:
        async with asyncio.timeout(5):
            line = await self.reader.readline()
        assert line.endswith(b"\n"), line
        decoded: dict[str, Any] = json.loads(line)
        return decoded

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def request(topic: str = f"dt/{THING}/t", payload: Any = "v") -> bytes:
    return json.dumps({"topic": topic, "payload": payload, "qos": 1}).encode()


async def test_socket_is_0660_and_removed_on_exit(socket_path: Path, outbox: Outbox) -> None:
    async with IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=outbox):
        st_mode = os.lstat(socket_path).st_mode
        assert stat.S_ISSOCK(st_mode)
        assert stat.S_IMODE(st_mode) == 0o660
    assert not await asyncio.to_thread(os.path.lexists, socket_path)


async def test_replies_in_order_and_bad_lines_do_not_break_anything(
    socket_path: Path, outbox: Outbox
) -> None:
    config = IngestConfig(socket_path=socket_path, allowed_prefixes=PREFIXES, max_line_bytes=4096)
    async with IngestServer(config=config, outbox=outbox):
        client = await Client.connect(socket_path)
        replies = await client.send(
            request(payload="first"),
            b"{not json",
            request(topic="dt/someone-else/t"),
            request(payload="x" * (128 * 1024 + 1)),
            b"y" * 10_000,
            b"",
            request(topic="dt/gw-42/#"),
            b'{"topic": "dt/gw-42/x", "payload": "\\ud800"}',
            request(payload={"second": 2}),
        )
        assert [r.get("error", "ok") for r in replies] == [
            "ok",
            "malformed_json",
            "topic_forbidden",
            "line_too_long",  # the oversized payload's line is over 4096 bytes here
            "line_too_long",
            "bad_request",
            "topic_invalid",
            "bad_request",
            "ok",
        ]
        assert replies[0]["ok"] is True
        first, second = replies[0]["id"], replies[-1]["id"]
        await client.close()
    messages = [await outbox.next_message() for _ in range(2)]
    assert [(m.message_id, m.payload) for m in messages] == [
        (first, b"first"),
        (second, b'{"second":2}'),
    ]
    assert outbox.stats().depth == 2


async def test_oversized_payload_gets_its_own_error(socket_path: Path, outbox: Outbox) -> None:
    async with IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=outbox):
        client = await Client.connect(socket_path)
        too_big, at_limit = await client.send(
            request(payload="x" * (128 * 1024 + 1)), request(payload="x" * (128 * 1024))
        )
        await client.close()
    assert too_big["error"] == "payload_too_large"
    assert "131073" in too_big["detail"]
    assert at_limit["ok"] is True


async def test_full_outbox_replies_outbox_full(socket_path: Path, tmp_path: Path) -> None:
    limits = OutboxLimits(max_messages=3)
    async with (
        Outbox(tmp_path / "full.db", limits=limits) as full,
        IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=full),
    ):
        client = await Client.connect(socket_path)
        replies = await client.send(*(request(payload=i) for i in range(5)))
        await client.close()
        assert [r.get("error", "ok") for r in replies] == ["ok"] * 3 + ["outbox_full"] * 2
        assert full.stats().refused == 2


async def test_drop_oldest_accepts_and_counts(socket_path: Path, tmp_path: Path) -> None:
    limits = OutboxLimits(max_messages=3, policy=OverflowPolicy.DROP_OLDEST)
    async with (
        Outbox(tmp_path / "drop.db", limits=limits) as dropping,
        IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=dropping),
    ):
        client = await Client.connect(socket_path)
        replies = await client.send(*(request(payload=i) for i in range(5)))
        await client.close()
        assert all(r["ok"] for r in replies)
        assert dropping.stats().dropped == 2
        kept = [(await dropping.next_message()).payload for _ in range(3)]
        assert kept == [b"2", b"3", b"4"]


async def test_many_producers_share_commits(socket_path: Path, outbox: Outbox) -> None:
    async with IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=outbox):

        async def produce(n: int) -> list[dict[str, Any]]:
            client = await Client.connect(socket_path)
            try:
                return await client.send(*(request(payload=f"{n}-{i}") for i in range(100)))
            finally:
                await client.close()

        results = await asyncio.gather(*(produce(n) for n in range(20)))
    ids = [r["id"] for replies in results for r in replies]
    assert len(set(ids)) == 2000
    assert outbox.stats().depth == 2000
    assert outbox.transactions < 400, outbox.transactions


async def test_a_vanishing_client_leaves_the_socket_up(socket_path: Path, outbox: Outbox) -> None:
    async with IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=outbox):
        rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rude.connect(str(socket_path))
        rude.sendall(request() + b"\n" + b'{"topic": "dt/gw-42/half')
        rude.close()
        client = await Client.connect(socket_path)
        (reply,) = await client.send(request(payload="after"))
        await client.close()
    assert reply["ok"] is True


async def test_last_line_without_newline_is_answered(socket_path: Path, outbox: Outbox) -> None:
    async with IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=outbox):
        client = await Client.connect(socket_path)
        client.writer.write(request(payload="no newline"))
        client.writer.write_eof()
        reply = await client.reply()
        await client.close()
    assert reply["ok"] is True


async def test_stale_socket_is_replaced_but_nothing_else(
    socket_path: Path, outbox: Outbox, tmp_path: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()  # bound, never listening: what a killed daemon leaves
    config = IngestConfig.for_thing(socket_path, THING)
    async with IngestServer(config=config, outbox=outbox):
        with pytest.raises(UsageError, match="another process"):
            async with IngestServer(config=config, outbox=outbox):
                pass
    regular = tmp_path / "x.sock"
    await asyncio.to_thread(regular.write_text, "precious")
    with pytest.raises(UsageError, match="not a socket"):
        async with IngestServer(config=IngestConfig.for_thing(regular, THING), outbox=outbox):
            pass
    assert await asyncio.to_thread(regular.read_text) == "precious"


async def test_closed_outbox_replies_unavailable(socket_path: Path, tmp_path: Path) -> None:
    closed = Outbox(tmp_path / "closed.db")
    async with IngestServer(config=IngestConfig.for_thing(socket_path, THING), outbox=closed):
        client = await Client.connect(socket_path)
        (reply,) = await client.send(request())
        await client.close()
    assert reply["error"] == "unavailable"
