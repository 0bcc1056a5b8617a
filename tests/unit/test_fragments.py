"""The fragment codec and reassembler: properties, bad input, supersede, eviction and expiry."""

from __future__ import annotations

import base64
import hashlib
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import (
    DigestMismatchError,
    FragmentConflictError,
    FragmentError,
    FragmentFormatError,
    LimitExceededError,
    UsageError,
    ZtpError,
)
from shared.fragments import (
    FORMAT_MAX_COUNT,
    MAX_FRAGMENT_CHARS,
    MIN_FRAGMENT_CHARS,
    Accepted,
    Completed,
    DropReason,
    Duplicate,
    Fragment,
    Outcome,
    Reassembler,
    ReassemblyLimits,
    Stale,
    UnsupportedVersionError,
    parse_fragment,
    split,
)

DOC = Path(__file__).resolve().parents[2] / "README.md"
PRINTABLE = re.compile(r"[\x20-\x7e]+")
# Large enough for any payload the properties generate at the smallest fragment size.
ROOMY = ReassemblyLimits(max_fragments=FORMAT_MAX_COUNT, max_payload_bytes=8192)
EXAMPLE = (
    b"endpoint=a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com;port=8883;alpn=none;thing=SN123456789"
)
CERT = b"-----BEGIN CERTIFICATE-----\n" + b"A" * 1240 + b"\n-----END CERTIFICATE-----\n"


def _replace_body(text: str, body: str) -> str:
    head, _, _ = text.rpartition(".")
    return f"{head}.{body}"


def _feed(
    reassembler: Reassembler, texts: list[str], *, source: str = "", now: float = 0.0
) -> list[Outcome]:
    return [reassembler.receive(text, now=now, source=source) for text in texts]


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=ROOMY.max_payload_bytes),
    max_chars=st.integers(MIN_FRAGMENT_CHARS, MAX_FRAGMENT_CHARS),
    transfer_id=st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True),
    seq=st.integers(0, 2**48 - 1),
    shuffle=st.randoms(use_true_random=False),
)
def test_split_shuffle_duplicate_reassemble(
    payload: bytes, max_chars: int, transfer_id: str, seq: int, shuffle: random.Random
) -> None:
    fragments = split(payload, transfer_id=transfer_id, max_chars=max_chars, seq=seq)
    for text in fragments:
        assert len(text) <= max_chars
        assert PRINTABLE.fullmatch(text)
        assert parse_fragment(text).text() == text
    # Every fragment at least once, some twice, in any order.
    texts = list(fragments) + shuffle.sample(fragments, k=shuffle.randint(0, len(fragments)))
    shuffle.shuffle(texts)
    reassembler = Reassembler(limits=ROOMY)
    outcomes = _feed(reassembler, texts, source="SN1")
    completed = [o for o in outcomes if isinstance(o, Completed)]
    assert len(completed) == 1
    assert completed[0].payload == payload
    assert completed[0].seq == seq
    first = outcomes.index(completed[0])
    # Before completion only new fragments and duplicates; after it, only duplicates.
    assert all(isinstance(o, Accepted | Duplicate) for o in outcomes[:first])
    assert all(isinstance(o, Duplicate) and o.completed for o in outcomes[first + 1 :])
    assert sum(isinstance(o, Accepted) for o in outcomes) == len(fragments) - 1
    assert reassembler.active == 0


@settings(max_examples=500, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.from_regex(r"Z1\.[^.]{0,40}\.[^.]{0,17}\.[^.]{0,5}\.[^.]{0,5}\.[^.]{0,9}\..{0,40}"),
    )
)
def test_arbitrary_text_only_raises_typed_errors(text: str) -> None:
    reassembler = Reassembler()
    try:
        outcome = reassembler.receive(text, now=0.0)
    except (FragmentError, LimitExceededError):
        return  # typed refusals; anything else escapes and fails the test
    assert isinstance(outcome, Accepted | Completed)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=600),
    position=st.integers(0, 10_000),
    replacement=st.sampled_from("AQgw-_z9"),
)
def test_a_changed_body_character_never_completes(
    payload: bytes, position: int, replacement: str
) -> None:
    fragments = list(split(payload, transfer_id="t", max_chars=128))
    index = position % len(fragments)
    body = parse_fragment(fragments[index]).body
    at = position % len(body)
    if body[at] == replacement:
        return
    fragments[index] = _replace_body(fragments[index], body[:at] + replacement + body[at + 1 :])
    reassembler = Reassembler(limits=ROOMY)
    with pytest.raises(FragmentError):
        _feed(reassembler, fragments)


# --- the codec ------------------------------------------------------------------------------


def test_a_certificate_needs_few_fragments() -> None:
    assert len(CERT) == 1295
    stream_chars = -(-(len(CERT) + 32) * 4 // 3)
    # 1,770 stream characters would need 7 headerless fragments of 255: the header costs one.
    assert stream_chars == 1770
    fragments = split(CERT, transfer_id="cert-7", seq=1)
    assert len(fragments) == 8
    assert all(len(text) == MAX_FRAGMENT_CHARS for text in fragments[:-1])
    # A 16-character id leaves 220 body characters per fragment: one more fragment.
    assert len(split(CERT, transfer_id="cert-SN123456789", seq=1)) == 9


def test_empty_payload_is_one_fragment_carrying_the_digest() -> None:
    (text,) = split(b"", transfer_id="e")
    fragment = parse_fragment(text)
    digest = hashlib.sha256(b"").digest()
    assert fragment.body == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert fragment.tag == fragment.body[:8]
    outcome = Reassembler().receive(text, now=0.0)
    assert isinstance(outcome, Completed)
    assert outcome.payload == b""


def test_fragment_fields() -> None:
    text = split(b"x" * 500, transfer_id="abc", seq=42, max_chars=100)[3]
    fragment = parse_fragment(text)
    assert (fragment.transfer_id, fragment.seq, fragment.index) == ("abc", 42, 3)
    assert fragment.count == 10
    assert text.startswith("Z1.abc.42.3.10.")


def test_documented_example_is_real_output() -> None:
    doc = DOC.read_text(encoding="utf-8")
    match = re.search(r"```text\nsplit\((.*?)\)\n(.*?)```", doc, re.DOTALL)
    assert match is not None, "the worked example block is missing"
    call, output = match.groups()
    expected = tuple(output.split())
    assert call == f'b"{EXAMPLE.decode()}", transfer_id="demo", seq=7, max_chars=96'
    assert split(EXAMPLE, transfer_id="demo", seq=7, max_chars=96) == expected
    assert len(expected) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"max_chars": MIN_FRAGMENT_CHARS - 1}, "max_chars", id="below-minimum"),
        pytest.param({"max_chars": 256}, "max_chars", id="above-255"),
        pytest.param({"max_chars": True}, "max_chars", id="bool-size"),
        pytest.param({"transfer_id": ""}, "transfer_id", id="empty-id"),
        pytest.param({"transfer_id": "a.b"}, "transfer_id", id="dot-in-id"),
        pytest.param({"transfer_id": "x" * 33}, "transfer_id", id="long-id"),
        pytest.param({"seq": -1}, "seq", id="negative-seq"),
        pytest.param({"seq": 2**48}, "seq", id="huge-seq"),
        pytest.param({"payload": "text"}, "payload", id="str-payload"),
        pytest.param(
            {"payload": bytes(800_000), "max_chars": MIN_FRAGMENT_CHARS},
            "9999",
            id="too-many-fragments",
        ),
    ],
)
def test_split_refuses_misuse(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"payload": b"p", "transfer_id": "t"} | kwargs
    payload = arguments.pop("payload")
    with pytest.raises(UsageError, match=message):
        split(payload, **arguments)  # type: ignore[arg-type]


GOOD = "Z1.t.0.0.1.AAAAAAAA.QUJD"


@pytest.mark.parametrize(
    ("text", "error", "field"),
    [
        pytest.param("", FragmentFormatError, "fragment", id="empty"),
        pytest.param("Z1.t.0.0", FragmentFormatError, "header", id="truncated-header"),
        pytest.param("Z1", FragmentFormatError, "header", id="version-only"),
        pytest.param(
            "Z1.t.0.x.1.AAAAAAAA.QUJD", FragmentFormatError, "header.index", id="index-nan"
        ),
        pytest.param(
            "Z1.t.0.1.1.AAAAAAAA.QUJD", FragmentFormatError, "header.index", id="index-eq-count"
        ),
        pytest.param(
            "Z1.t.0.-1.2.AAAAAAAA.QUJD", FragmentFormatError, "header.index", id="index-neg"
        ),
        pytest.param(
            "Z1.t.0.01.2.AAAAAAAA.QUJD", FragmentFormatError, "header.index", id="index-zero-pad"
        ),
        pytest.param(
            "Z1.t.0.0.0.AAAAAAAA.QUJD", FragmentFormatError, "header.count", id="count-zero"
        ),
        pytest.param(
            "Z1.t.0.0.10000.AAAAAAAA.QUJD",
            FragmentFormatError,
            "header.count",
            id="count-above-format",
        ),
        pytest.param(
            "Z1.t.0.0. 1.AAAAAAAA.QUJD", FragmentFormatError, "header.count", id="count-space"
        ),
        pytest.param("Z1.t.x.0.1.AAAAAAAA.QUJD", FragmentFormatError, "header.seq", id="seq-nan"),
        pytest.param(
            "Z1.t.281474976710656.0.1.AAAAAAAA.QUJD",
            FragmentFormatError,
            "header.seq",
            id="seq-huge",
        ),
        pytest.param(
            "Z1..0.0.1.AAAAAAAA.QUJD", FragmentFormatError, "header.transfer_id", id="id-empty"
        ),
        pytest.param(
            "Z1.t!.0.0.1.AAAAAAAA.QUJD", FragmentFormatError, "header.transfer_id", id="id-alphabet"
        ),
        pytest.param(
            "Z1." + "t" * 33 + ".0.0.1.AAAAAAAA.QUJD",
            FragmentFormatError,
            "header.transfer_id",
            id="id-long",
        ),
        pytest.param("Z1.t.0.0.1.AAAAAAA.QUJD", FragmentFormatError, "header.tag", id="tag-short"),
        pytest.param(
            "Z1.t.0.0.1.AAAA+AAA.QUJD", FragmentFormatError, "header.tag", id="tag-alphabet"
        ),
        pytest.param("Z1.t.0.0.1.AAAAAAAA.", FragmentFormatError, "body", id="body-empty"),
        pytest.param("Z1.t.0.0.1.AAAAAAAA.QUJ=", FragmentFormatError, "body", id="body-padding"),
        pytest.param("Z1.t.0.0.1.AAAAAAAA.QU.JD", FragmentFormatError, "body", id="body-extra-dot"),
        pytest.param("Z1.t.0.0.1.AAAAAAAA.QUJDé", FragmentFormatError, "fragment", id="non-ascii"),
        pytest.param(
            "Z1.t.0.0.1.AAAAAAAA.QUJD\n", FragmentFormatError, "fragment", id="control-char"
        ),
        pytest.param(GOOD + "A" * 240, FragmentFormatError, "fragment", id="too-long"),
        pytest.param(
            "Z2.t.0.0.1.AAAAAAAA.QUJD", UnsupportedVersionError, "header.version", id="version-2"
        ),
        pytest.param(
            "ZTP.t.0.0.1.AAAAAAAA.QUJD", FragmentFormatError, "header.version", id="not-ours"
        ),
        pytest.param(
            "-----BEGIN CERTIFICATE-----", FragmentFormatError, "header.version", id="raw-pem"
        ),
    ],
)
def test_parse_refuses_bad_fragments(
    text: str, error: type[FragmentFormatError], field: str
) -> None:
    parse_fragment(GOOD)  # the baseline the cases mutate parses
    with pytest.raises(error) as caught:
        parse_fragment(text)
    assert type(caught.value) is error
    assert caught.value.field == field


def test_fragment_validates_when_built() -> None:
    with pytest.raises(FragmentFormatError, match=r"header\.index"):
        Fragment(transfer_id="t", seq=0, index=2, count=2, tag="AAAAAAAA", body="QQ")


# --- the reassembler: errors -------------------------------------------------------------------


def _mixed_tags(r: Reassembler) -> None:
    one = split(b"a" * 300, transfer_id="t", max_chars=128)
    other = split(b"b" * 300, transfer_id="t", max_chars=128)
    r.receive(one[0], now=0.0)
    r.receive(other[1], now=0.0)


def _mixed_counts(r: Reassembler) -> None:
    r.receive(split(b"a" * 300, transfer_id="t", max_chars=128)[0], now=0.0)
    r.receive(split(b"a" * 300, transfer_id="t", max_chars=200)[1], now=0.0)


def _mixed_seqs(r: Reassembler) -> None:
    r.receive(split(b"a" * 300, transfer_id="t", seq=1)[0], now=0.0)
    r.receive(split(b"a" * 300, transfer_id="t", seq=2)[1], now=0.0)


def _conflicting_duplicate(r: Reassembler) -> None:
    text = split(b"a" * 300, transfer_id="t")[0]
    r.receive(text, now=0.0)
    r.receive(_replace_body(text, "B" + parse_fragment(text).body[1:]), now=0.0)


def _reused_completed_id(r: Reassembler) -> None:
    _feed(r, list(split(b"first", transfer_id="t")))
    r.receive(split(b"second", transfer_id="t")[0], now=0.0)


def _wrong_digest(r: Reassembler) -> None:
    payload = b"certificate body"
    wrong = hashlib.sha256(b"something else").digest()
    stream = base64.urlsafe_b64encode(payload + wrong).decode().rstrip("=")
    tag = base64.urlsafe_b64encode(wrong).decode()[:8]
    r.receive(f"Z1.t.0.0.1.{tag}.{stream}", now=0.0)


def _tag_disagrees_with_digest(r: Reassembler) -> None:
    (text,) = split(b"payload", transfer_id="t")
    r.receive(text.replace(parse_fragment(text).tag, "AAAAAAAA"), now=0.0)


def _non_canonical_stream(r: Reassembler) -> None:
    (text,) = split(b"payload!", transfer_id="t")
    body = parse_fragment(text).body
    # 8 + 32 bytes encode to 54 characters, the last with 4 unused low bits: set one of them.
    assert len(body) == 54
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    r.receive(_replace_body(text, body[:-1] + last[last.index(body[-1]) + 1]), now=0.0)


def _stream_too_short(r: Reassembler) -> None:
    r.receive("Z1.t.0.0.1.AAAAAAAA.QUJD", now=0.0)


def _count_above_limit(r: Reassembler) -> None:
    r.receive(split(bytes(5000), transfer_id="t", max_chars=100)[0], now=0.0)


def _oversized_payload(r: Reassembler) -> None:
    _feed(r, list(split(bytes(8193), transfer_id="t")))


def _too_many_from_one_source(r: Reassembler) -> None:
    for n in range(5):
        r.receive(split(bytes(300), transfer_id=f"t{n}")[0], now=0.0, source="SN1")


def _bad_now(r: Reassembler) -> None:
    r.receive(GOOD, now=float("nan"))


def _bad_source(r: Reassembler) -> None:
    r.receive(GOOD, now=0.0, source=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scenario", "error", "detail"),
    [
        pytest.param(_mixed_tags, FragmentConflictError, "header.tag", id="mixed-transfers-tag"),
        pytest.param(
            _mixed_counts, FragmentConflictError, "header.count", id="mixed-transfers-count"
        ),
        pytest.param(_mixed_seqs, FragmentConflictError, "header.seq", id="mixed-transfers-seq"),
        pytest.param(
            _conflicting_duplicate, FragmentConflictError, "body", id="conflicting-duplicate"
        ),
        pytest.param(
            _reused_completed_id, FragmentConflictError, "header", id="reused-completed-id"
        ),
        pytest.param(_wrong_digest, DigestMismatchError, "digest", id="wrong-digest"),
        pytest.param(_tag_disagrees_with_digest, DigestMismatchError, "digest", id="wrong-tag"),
        pytest.param(_non_canonical_stream, FragmentFormatError, "body", id="non-canonical"),
        pytest.param(_stream_too_short, FragmentFormatError, "body", id="no-room-for-digest"),
        pytest.param(_count_above_limit, LimitExceededError, "max_fragments", id="count-above-max"),
        pytest.param(_oversized_payload, LimitExceededError, "max_payload_bytes", id="oversized"),
        pytest.param(
            _too_many_from_one_source,
            LimitExceededError,
            "max_transfers_per_source",
            id="too-many-per-source",
        ),
        pytest.param(_bad_now, UsageError, None, id="now-nan"),
        pytest.param(_bad_source, UsageError, None, id="source-not-str"),
    ],
)
def test_reassembler_refuses(
    scenario: Callable[[Reassembler], None], error: type[ZtpError], detail: str | None
) -> None:
    with pytest.raises(error) as caught:
        scenario(Reassembler())
    assert type(caught.value) is error
    if isinstance(caught.value, LimitExceededError):
        assert caught.value.limit_name == detail
        assert caught.value.actual > caught.value.limit
    elif isinstance(caught.value, FragmentError):
        assert caught.value.field == detail


def test_a_failed_transfer_is_dropped_and_can_be_resent() -> None:
    r = Reassembler()
    with pytest.raises(DigestMismatchError):
        _wrong_digest(r)
    assert r.active == 0
    (text,) = split(b"certificate body", transfer_id="t")
    assert isinstance(r.receive(text, now=1.0), Completed)


def test_an_oversized_transfer_is_refused_before_it_is_all_held() -> None:
    fragments = split(bytes(20_000), transfer_id="t", max_chars=255)
    r = Reassembler(limits=ReassemblyLimits(max_fragments=200))
    with pytest.raises(LimitExceededError) as caught:
        _feed(r, list(fragments))
    assert caught.value.limit_name == "max_payload_bytes"
    assert r.active == 0


# --- the reassembler: outcomes ------------------------------------------------------------------


def test_duplicates_are_reported_before_and_after_completion() -> None:
    a, b = split(bytes(300), transfer_id="t")
    r = Reassembler()
    assert r.receive(a, now=0.0, source="S") == Accepted(
        source="S", transfer_id="t", index=0, received=1, count=2
    )
    assert r.receive(a, now=0.0, source="S") == Duplicate(
        source="S", transfer_id="t", index=0, completed=False
    )
    assert isinstance(r.receive(b, now=0.0, source="S"), Completed)
    assert r.receive(a, now=0.0, source="S") == Duplicate(
        source="S", transfer_id="t", index=0, completed=True
    )


def test_completed_ids_are_remembered_boundedly() -> None:
    r = Reassembler(limits=ReassemblyLimits(max_completed=2))
    first = split(bytes(300), transfer_id="t0")
    _feed(r, list(first))
    for n in (1, 2):
        _feed(r, list(split(bytes(300), transfer_id=f"t{n}")))
    # t0 was forgotten: its late copy starts a transfer again (which then expires).
    assert isinstance(r.receive(first[0], now=0.0), Accepted)


def test_sources_are_kept_apart() -> None:
    one = split(b"device one", transfer_id="csr")
    two = split(b"device two", transfer_id="csr")
    r = Reassembler()
    a = r.receive(one[0], now=0.0, source="SN1")
    b = r.receive(two[0], now=0.0, source="SN2")
    assert isinstance(a, Completed)
    assert isinstance(b, Completed)
    assert (a.payload, b.payload) == (b"device one", b"device two")


def test_a_newer_seq_supersedes_and_late_fragments_are_stale() -> None:
    old = split(bytes(300), transfer_id="old", seq=4)
    new = split(bytes(200), transfer_id="new", seq=5)
    r = Reassembler()
    r.receive(old[0], now=0.0, source="S")
    started = r.receive(new[0], now=1.0, source="S")
    assert isinstance(started, Accepted)
    (dropped,) = started.dropped
    assert (dropped.transfer_id, dropped.reason, dropped.received) == (
        "old",
        DropReason.SUPERSEDED,
        1,
    )
    assert r.receive(old[1], now=2.0, source="S") == Stale(
        source="S", transfer_id="old", seq=4, newest_seq=5
    )
    # Another source's newer seq does not touch this source.
    r.receive(split(bytes(300), transfer_id="x", seq=99)[0], now=2.0, source="T")
    assert isinstance(r.receive(new[1], now=3.0, source="S"), Completed)


def test_transfers_with_the_same_seq_coexist() -> None:
    cert = split(bytes(300), transfer_id="cert", seq=3)
    endpoint = split(bytes(300), transfer_id="endpoint", seq=3)
    r = Reassembler()
    outcomes = _feed(r, [cert[0], endpoint[0], cert[1], endpoint[1]])
    assert [type(o) for o in outcomes] == [Accepted, Accepted, Completed, Completed]
    assert all(not o.dropped for o in outcomes)


def test_a_full_reassembler_evicts_the_least_recently_active() -> None:
    limits = ReassemblyLimits(max_transfers=2, max_sources=2)
    r = Reassembler(limits=limits)
    a = split(bytes(600), transfer_id="a")
    b = split(bytes(600), transfer_id="b")
    r.receive(a[0], now=0.0, source="A")
    r.receive(b[0], now=1.0, source="B")
    r.receive(a[1], now=2.0, source="A")  # a is now more recently active than b
    outcome = r.receive(split(bytes(600), transfer_id="c")[0], now=3.0, source="C")
    assert isinstance(outcome, Accepted)
    (dropped,) = outcome.dropped
    assert (dropped.source, dropped.transfer_id, dropped.reason) == ("B", "b", DropReason.EVICTED)
    assert r.active == 2
    assert isinstance(r.receive(a[2], now=4.0, source="A"), Accepted)


def test_forgotten_sources_never_hold_transfers() -> None:
    limits = ReassemblyLimits(max_transfers=1, max_sources=1)
    r = Reassembler(limits=limits)
    old = split(bytes(300), transfer_id="old", seq=1)
    r.receive(split(bytes(300), transfer_id="new", seq=2)[0], now=0.0, source="S")
    r.receive(split(bytes(300), transfer_id="t")[0], now=0.0, source="T")
    # S held nothing after eviction, so its newest seq was forgotten: a late seq-1 fragment
    # is taken as a new transfer, as the format document says.
    assert isinstance(r.receive(old[0], now=0.0, source="S"), Accepted)


def test_expire_drops_idle_transfers() -> None:
    r = Reassembler(limits=ReassemblyLimits(transfer_ttl=60.0))
    a = split(bytes(300), transfer_id="a")
    b = split(bytes(300), transfer_id="b")
    r.receive(a[0], now=0.0)
    r.receive(b[0], now=30.0)
    assert r.expire(now=60.0) == ()
    (dropped,) = r.expire(now=60.5)
    assert (dropped.transfer_id, dropped.reason) == ("a", DropReason.EXPIRED)
    assert r.active == 1
    with pytest.raises(UsageError):
        r.expire(now=float("inf"))


def test_receive_expires_lazily() -> None:
    r = Reassembler(limits=ReassemblyLimits(transfer_ttl=60.0))
    a = split(bytes(300), transfer_id="a")
    r.receive(a[0], now=0.0)
    outcome = r.receive(a[1], now=100.0)
    # The expired half was dropped first, so this fragment starts the transfer afresh.
    assert isinstance(outcome, Accepted)
    assert outcome.received == 1
    (dropped,) = outcome.dropped
    assert dropped.reason is DropReason.EXPIRED


def test_outcomes_dispatch_with_match() -> None:
    r = Reassembler()
    seen: list[str] = []
    for text in split(bytes(300), transfer_id="t"):
        match r.receive(text, now=0.0):
            case Accepted(received=received, count=count):
                seen.append(f"{received}/{count}")
            case Completed(payload=payload):
                seen.append(f"done {len(payload)}")
            case Duplicate() | Stale():
                seen.append("other")
    assert seen == ["1/2", "done 300"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_fragments": 0},
        {"max_fragments": FORMAT_MAX_COUNT + 1},
        {"max_payload_bytes": -1},
        {"max_transfers": True},
        {"transfer_ttl": 0.0},
        {"transfer_ttl": float("nan")},
        {"max_transfers": 10, "max_sources": 9},
    ],
)
def test_limits_validate_when_built(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        ReassemblyLimits(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=700), min_size=1, max_size=8),
    sources=st.lists(st.sampled_from(["", "SN1", "SN2"]), min_size=8, max_size=8),
    shuffle=st.randoms(use_true_random=False),
)
def test_interleaved_transfers_from_several_sources(
    payloads: list[bytes], sources: list[str], shuffle: random.Random
) -> None:
    # Same seq everywhere, so nothing supersedes; all eight may come from one source.
    limits = ReassemblyLimits(max_transfers_per_source=8)
    sent = {
        (sources[n], f"t{n}"): (payload, split(payload, transfer_id=f"t{n}", max_chars=128))
        for n, payload in enumerate(payloads)
    }
    texts = [(source, text) for (source, _), (_, frags) in sent.items() for text in frags]
    shuffle.shuffle(texts)
    r = Reassembler(limits=limits)
    done: dict[tuple[str, str], bytes] = {}
    for source, text in texts:
        outcome = r.receive(text, now=0.0, source=source)
        assert not outcome.dropped
        if isinstance(outcome, Completed):
            done[(outcome.source, outcome.transfer_id)] = outcome.payload
    assert done == {key: payload for key, (payload, _) in sent.items()}


def test_a_malformed_fragment_changes_nothing() -> None:
    r = Reassembler(limits=ReassemblyLimits(transfer_ttl=60.0))
    a = split(bytes(300), transfer_id="a")
    r.receive(a[0], now=0.0)
    with pytest.raises(FragmentFormatError):
        r.receive("Z1.a.0.9.2.AAAAAAAA.QUJD", now=1000.0)
    assert r.active == 1  # not even expired: the bad text was refused before anything else


def test_a_newer_seq_is_not_refused_by_the_per_source_bound() -> None:
    r = Reassembler(limits=ReassemblyLimits(max_transfers_per_source=2))
    for name in ("a", "b"):
        r.receive(split(bytes(300), transfer_id=name, seq=1)[0], now=0.0, source="S")
    with pytest.raises(LimitExceededError):
        r.receive(split(bytes(300), transfer_id="c", seq=1)[0], now=0.0, source="S")
    outcome = r.receive(split(bytes(300), transfer_id="d", seq=2)[0], now=0.0, source="S")
    assert isinstance(outcome, Accepted)
    assert sorted(d.transfer_id for d in outcome.dropped) == ["a", "b"]
    assert r.active == 1


def test_max_payload_bytes_is_inclusive() -> None:
    limits = ReassemblyLimits(max_payload_bytes=1000)
    outcomes = _feed(Reassembler(limits=limits), list(split(bytes(1000), transfer_id="t")))
    assert isinstance(outcomes[-1], Completed)
    with pytest.raises(LimitExceededError) as caught:
        _feed(Reassembler(limits=limits), list(split(bytes(1001), transfer_id="t")))
    assert (caught.value.limit, caught.value.actual) == (1000, 1001)
