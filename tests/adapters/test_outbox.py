"""The durable outbox: its pure core (table-driven and property-based) and real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import DecodeError, LimitExceededError, PeerError, UsageError
from tests.adapters import publisher_fixtures as pf
from ztp_daemon.errors import DeviceError, StorageError
from ztp_daemon.outbox import (
    Durability,
    EntryState,
    Outbox,
    OutboxClosedError,
    OutboxCore,
    OutboxFullError,
    OutboxLimits,
    OverflowPolicy,
    PayloadTooLargeError,
    StoredMessage,
    TopicError,
    _delete_runs,
    check_topic,
)

REPO = Path(__file__).resolve().parents[2]


def limits(**overrides: object) -> OutboxLimits:
    base: dict[str, object] = {"max_messages": 5, "max_bytes": 1000, "max_payload_bytes": 500}
    base.update(overrides)
    return OutboxLimits(**base)  # type: ignore[arg-type]


def admitted(core: OutboxCore, size: int = 10) -> int:
    """Admit and commit one message; return its seq."""
    seq = core.admit(size).seq
    core.committed((seq,))
    return seq


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["dt/thing/x", "a", "dt/thing/" + "é" * 100, "a/b/c/d/e/f/g/h", "$aws/things/t/shadow/update"],
)
def test_publishable_topics_pass(topic: str) -> None:
    check_topic(topic)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("", "non-empty"),
        ("dt/+/x", "wildcards"),
        ("dt/#", "wildcards"),
        ("dt/a\x00b", "NUL"),
        ("a" * 257, "256 UTF-8 bytes"),
        ("é" * 129, "256 UTF-8 bytes"),
        ("a/b/c/d/e/f/g/h/i", "7 '/'"),
    ],
)
def test_unpublishable_topics_raise_topic_error(topic: str, expected: str) -> None:
    with pytest.raises(TopicError) as caught:
        check_topic(topic)
    assert expected in caught.value.expected
    assert isinstance(caught.value, DecodeError)
    assert isinstance(caught.value, DeviceError)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_messages": 0},
        {"max_payload_bytes": 0},
        {"max_payload_bytes": 128 * 1024 + 1},
        {"max_bytes": 10, "max_payload_bytes": 11},
        {"max_in_flight": 0},
        {"max_in_flight": 101},
        {"resident_bytes": -1},
    ],
)
def test_limits_validate_when_built(bad: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        OutboxLimits(**bad)  # type: ignore[arg-type]


# -- the pure core -----------------------------------------------------------------------------


def test_core_life_of_a_message() -> None:
    core = OutboxCore(limits())
    admission = core.admit(10)
    assert admission.seq == 1
    assert admission.dropped == ()
    assert core.state(1) is EntryState.ACCEPTED
    assert core.take() is None, "an uncommitted message is not sendable"
    core.committed((1,))
    assert core.state(1) is EntryState.QUEUED
    assert core.take() == 1
    assert core.state(1) is EntryState.IN_FLIGHT
    assert core.in_flight == 1
    assert core.ack(1) == 10
    assert core.state(1) is EntryState.GONE
    assert (core.depth, core.bytes, core.in_flight) == (0, 0, 0)
    stats = core.stats()
    assert (stats.accepted, stats.acked, stats.dropped, stats.refused) == (1, 1, 0, 0)


def test_core_sends_in_order_and_an_uncommitted_head_blocks() -> None:
    core = OutboxCore(limits(max_messages=10))
    first, second = core.admit(1).seq, core.admit(1).seq
    core.committed((second,))
    assert core.take() is None, "the head is still being committed"
    core.committed((first,))
    assert [core.take(), core.take(), core.take()] == [first, second, None]


def test_core_in_flight_bound() -> None:
    core = OutboxCore(limits(max_messages=10, max_in_flight=2))
    seqs = [admitted(core) for _ in range(3)]
    assert [core.take(), core.take(), core.take()] == [seqs[0], seqs[1], None]
    core.ack(seqs[0])
    assert core.take() == seqs[2]


def test_core_release_puts_messages_back_at_the_head_in_order() -> None:
    core = OutboxCore(limits(max_messages=10))
    seqs = [admitted(core) for _ in range(4)]
    taken = [core.take(), core.take(), core.take()]
    assert taken == seqs[:3]
    core.ack(seqs[1])
    core.release([seqs[2], seqs[0]])
    assert core.in_flight == 0
    assert [core.take(), core.take(), core.take()] == [seqs[0], seqs[2], seqs[3]]


@pytest.mark.parametrize(
    ("operation", "state"),
    [("ack", EntryState.QUEUED), ("ack", EntryState.GONE), ("release", EntryState.QUEUED)],
)
def test_core_illegal_moves_raise_and_change_nothing(operation: str, state: EntryState) -> None:
    core = OutboxCore(limits())
    seq = admitted(core)
    if state is EntryState.GONE:
        core.take()
        core.ack(seq)
    before = core.stats()
    move = core.ack if operation == "ack" else (lambda s: core.release([s]))
    with pytest.raises(UsageError):
        move(seq)
    assert core.state(seq) is state
    assert core.stats() == before


def test_core_refuses_by_count_with_back_pressure() -> None:
    core = OutboxCore(limits(max_messages=2))
    admitted(core)
    admitted(core)
    with pytest.raises(OutboxFullError) as caught:
        core.admit(1)
    error = caught.value
    assert (error.limit_name, error.limit, error.actual) == ("outbox_max_messages", 2, 3)
    assert isinstance(error, LimitExceededError)
    assert isinstance(error, PeerError)
    assert core.depth == 2
    assert core.stats().refused == 1


def test_core_refuses_by_bytes() -> None:
    core = OutboxCore(limits(max_bytes=600))
    admitted(core, 400)
    with pytest.raises(OutboxFullError) as caught:
        core.admit(201)
    assert (caught.value.limit_name, caught.value.actual) == ("outbox_max_bytes", 601)
    core.admit(200)  # exactly at the bound is fine


def test_core_refuses_oversized_payloads_whatever_the_policy() -> None:
    for policy in OverflowPolicy:
        core = OutboxCore(limits(policy=policy))
        with pytest.raises(PayloadTooLargeError) as caught:
            core.admit(501)
        assert (caught.value.limit_name, caught.value.limit) == ("max_payload_bytes", 500)
        assert core.depth == 0


def test_core_drop_oldest_drops_queued_not_in_flight() -> None:
    core = OutboxCore(limits(max_messages=3, policy=OverflowPolicy.DROP_OLDEST))
    a, b, c = admitted(core, 1), admitted(core, 2), admitted(core, 3)
    assert core.take() == a
    admission = core.admit(4)
    assert admission.dropped == ((b, 2),)
    assert core.state(b) is EntryState.GONE
    assert core.state(a) is EntryState.IN_FLIGHT
    assert core.state(c) is EntryState.QUEUED
    assert core.stats().dropped == 1
    assert core.depth == 3
    assert core.bytes == 1 + 3 + 4


def test_core_drop_oldest_by_bytes_drops_as_many_as_needed() -> None:
    core = OutboxCore(limits(max_bytes=1000, policy=OverflowPolicy.DROP_OLDEST))
    seqs = [admitted(core, 300) for _ in range(3)]
    admission = core.admit(500)
    assert [seq for seq, _ in admission.dropped] == seqs[:2]
    assert core.bytes == 800


def test_core_drop_oldest_refuses_when_only_in_flight_is_left() -> None:
    core = OutboxCore(limits(max_messages=2, policy=OverflowPolicy.DROP_OLDEST))
    admitted(core)
    admitted(core)
    core.take()
    core.take()
    with pytest.raises(OutboxFullError):
        core.admit(1)
    assert core.stats().refused == 1
    assert core.in_flight == 2


def test_core_drop_oldest_drops_nothing_when_room_cannot_be_made() -> None:
    """In flight 700 of 1000 bytes: a 400-byte message cannot fit, so nothing queued is lost."""
    core = OutboxCore(limits(max_bytes=1000, policy=OverflowPolicy.DROP_OLDEST))
    big = admitted(core, 400)
    other = admitted(core, 300)
    queued = admitted(core, 200)
    assert core.take() == big
    assert core.take() == other
    with pytest.raises(OutboxFullError):
        core.admit(400)
    assert core.state(queued) is EntryState.QUEUED
    assert core.stats().dropped == 0
    assert core.admit(300).dropped == ((queued, 200),)


def test_core_admit_many_is_all_or_none() -> None:
    core = OutboxCore(limits(max_messages=5, max_bytes=1000))
    first = core.admit_many([10, 20])
    assert first.seqs == (1, 2)
    with pytest.raises(OutboxFullError):
        core.admit_many([1, 1, 1, 1])
    assert core.depth == 2
    assert core.stats().refused == 4
    with pytest.raises(PayloadTooLargeError):
        core.admit_many([1, 501])
    assert core.depth == 2
    assert core.admit_many([1, 1, 1]).seqs == (3, 4, 5)


def test_core_admit_many_drops_what_it_needs() -> None:
    core = OutboxCore(limits(max_messages=4, policy=OverflowPolicy.DROP_OLDEST))
    seqs = [admitted(core) for _ in range(4)]
    core.take()
    batch = core.admit_many([1, 1])
    assert [seq for seq, _ in batch.dropped] == seqs[1:3]
    assert core.depth == 4
    with pytest.raises(OutboxFullError):
        core.admit_many([1] * 4)  # one is in flight: four new ones can never fit
    assert core.depth == 4


def test_core_restore_continues_the_sequence_and_keeps_everything() -> None:
    core = OutboxCore(limits(max_messages=2))
    for seq in (4, 7, 9):
        core.restore(seq, 10)
    assert core.depth == 3, "restored messages are kept even beyond the bound"
    assert [core.take(), core.take(), core.take()] == [4, 7, 9]
    with pytest.raises(OutboxFullError):
        core.admit(1)
    core.ack(4)
    core.ack(7)
    assert core.admit(1).seq == 10


def test_core_abandon_forgets_an_uncommitted_message() -> None:
    core = OutboxCore(limits())
    seq = core.admit(10).seq
    core.abandon(seq)
    assert core.state(seq) is EntryState.GONE
    assert (core.depth, core.bytes, core.stats().accepted) == (0, 0, 0)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "commit", "take", "ack", "release"]),
        st.integers(0, 400),
    ),
    max_size=200,
)


@given(ops=_OPS, policy=st.sampled_from(list(OverflowPolicy)))
@settings(max_examples=150, deadline=None)
def test_core_properties(ops: list[tuple[str, int]], policy: OverflowPolicy) -> None:
    """Bounds hold, bytes add up, and every accepted message ends acked, dropped or held."""
    lim = limits(max_messages=6, max_bytes=1200, max_in_flight=3, policy=policy)
    core = OutboxCore(lim)
    sizes: dict[int, int] = {}
    uncommitted: list[int] = []
    in_flight: list[int] = []
    acked: set[int] = set()
    dropped: set[int] = set()
    for op, arg in ops:
        if op == "admit":
            try:
                admission = core.admit(arg)
            except OutboxFullError:
                continue
            sizes[admission.seq] = arg
            uncommitted.append(admission.seq)
            dropped.update(seq for seq, _ in admission.dropped)
            assert all(seq not in in_flight for seq, _ in admission.dropped)
        elif op == "commit" and uncommitted:
            core.committed(uncommitted)
            uncommitted.clear()
        elif op == "take":
            seq = core.take()
            if seq is not None:
                in_flight.append(seq)
        elif op == "ack" and in_flight:
            seq = in_flight.pop(arg % len(in_flight))
            core.ack(seq)
            acked.add(seq)
        elif op == "release" and in_flight:
            core.release(in_flight)
            in_flight.clear()
        assert core.depth <= lim.max_messages
        assert core.bytes <= lim.max_bytes
        assert core.in_flight == len(in_flight) <= lim.max_in_flight
        held = {seq for seq in sizes if core.state(seq) is not EntryState.GONE}
        assert core.bytes == sum(sizes[seq] for seq in held)
        assert held | acked | dropped == set(sizes)
        assert not (acked & dropped)
        assert core.stats().dropped == len(dropped)
    if policy is OverflowPolicy.REFUSE:
        assert not dropped


def test_core_take_head_if_takes_only_a_sendable_ready_head() -> None:
    core = OutboxCore(limits(max_in_flight=2))
    first = core.admit(10).seq
    assert core.take_head_if({first}) is None, "uncommitted"
    core.committed((first,))
    second = admitted(core, 20)
    third = admitted(core, 30)
    assert core.take_head_if({second}) is None, "the head is not ready: nothing overtakes it"
    assert core.state(first) is EntryState.QUEUED
    assert core.take_head_if({first, second, third}) == first
    assert core.take_head_if({second, third}) == second
    assert core.take_head_if({third}) is None, "the in-flight bound"
    assert (core.in_flight, core.state(second), core.state(third)) == (
        2,
        EntryState.IN_FLIGHT,
        EntryState.QUEUED,
    )
    assert core.ack(first) == 10
    assert core.take_head_if({third}) == third
    assert core.bytes == 50


_RUNS = st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 300)), max_size=8).map(
    lambda runs: [seq for first, length in runs for seq in range(first, first + length)]
)


@given(seqs=st.one_of(st.lists(st.integers(1, 60), max_size=120), _RUNS))
def test_delete_runs_cover_every_seq_once(seqs: list[int]) -> None:
    singles, ranges = _delete_runs(seqs)
    expanded = [seq for first, last in ranges for seq in range(first, last + 1)]
    assert sorted(singles + expanded) == sorted(set(seqs)), "every seq once, nothing else"
    assert all(last - first + 1 >= 8 for first, last in ranges)
    # Maximal: no run of 8 consecutive seqs is left in the IN list, and ranges never touch.
    lone = set(singles)
    assert not any(all(seq + k in lone for k in range(8)) for seq in lone)
    bounds = sorted(ranges)
    assert all(a_last + 1 < b_first for (_, a_last), (b_first, _) in itertools.pairwise(bounds))
    assert not any(first - 1 in lone or last + 1 in lone for first, last in ranges)


def test_delete_runs_of_in_order_acks_are_ranges() -> None:
    seqs = [*range(101, 201), 7, *range(1, 5), *range(300, 320)]
    assert _delete_runs(seqs) == ([1, 2, 3, 4, 7], [(101, 200), (300, 319)])


# -- real SQLite -------------------------------------------------------------------------------


async def drain(outbox: Outbox) -> list[tuple[str, bytes, str]]:
    """Take and ack everything queued; return (topic, payload, id) in send order."""
    out = []
    while outbox.stats().depth > outbox.stats().in_flight:
        message = await asyncio.wait_for(outbox.next_message(), 2)
        out.append((message.topic, message.payload, message.message_id))
        outbox.ack(message.seq)
    return out


async def test_put_is_durable_and_ids_are_stable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as outbox:
        ids = [await outbox.put("dt/t/x", f"m{i}".encode()) for i in range(3)]
        uid = outbox.uid
    assert [i.rsplit("-", 1) for i in ids] == [[uid, "1"], [uid, "2"], [uid, "3"]]
    async with Outbox(path) as outbox:
        assert outbox.uid == uid
        assert outbox.stats().depth == 3
        message = await outbox.next_message()
        assert (message.message_id, message.topic, message.payload) == (ids[0], "dt/t/x", b"m0")
        outbox.release(message.seq)
        assert [m[2] for m in await drain(outbox)] == ids
        assert (await outbox.put("dt/t/x", b"next")).endswith("-4")
    async with Outbox(path) as outbox:
        assert outbox.stats().depth == 1, "acked rows were deleted before close"


async def test_acks_in_runs_and_out_of_order_delete_exactly_their_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    keep = {5, 50, 51, 199, 250}
    async with Outbox(path) as outbox:
        await outbox.submit_many("dt/t/x", [f"m{i}".encode() for i in range(1, 301)])
        taken = 0
        rounds = 0
        while taken < 300:
            batch: list[StoredMessage] = []
            while (message := outbox.take_nowait()) is not None:
                assert message == StoredMessage(
                    message.seq, message.message_id, "dt/t/x", f"m{message.seq}".encode(), 1
                )
                batch.append(message)
            taken += len(batch)
            # Acked reversed, interleaved, in order: ranges and singles; the kept stay in flight.
            orders = (batch[::-1], batch[::2] + batch[1::2], batch)
            for acked in orders[rounds % 3]:
                if acked.seq not in keep:
                    outbox.ack(acked.seq)
            rounds += 1
            await asyncio.sleep(0.15)  # the deletes' transaction (they wait up to 100 ms)
        assert rounds >= 3
        assert outbox.stats().depth == len(keep)
    async with Outbox(path) as outbox:
        assert sorted(int(m[2].rsplit("-", 1)[1]) for m in await drain(outbox)) == sorted(keep)


async def test_acked_rows_leave_the_file_soon_without_further_traffic(tmp_path: Path) -> None:
    """Deletes wait for a timer (up to 100 ms), not for the next insert or the close."""
    path = tmp_path / "outbox.db"

    def rows() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            count: int = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            return count

    async with Outbox(path) as outbox:
        await outbox.submit_many("dt/t/x", [b"a", b"b"])
        assert rows() == 2
        first = outbox.take_nowait()
        assert first is not None
        outbox.ack(first.seq)
        assert rows() == 2, "a PUBACK's delete waits to share a transaction"
        deadline = asyncio.get_running_loop().time() + 2.0
        while rows() != 1:
            assert asyncio.get_running_loop().time() < deadline, "the acked row stayed"
            await asyncio.sleep(0.02)
        assert outbox.stats().depth == 1


async def test_in_flight_at_close_is_sent_again(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as outbox:
        await outbox.put("dt/t/x", b"a")
        await outbox.put("dt/t/x", b"b")
        first = outbox.take_nowait()
        assert first is not None
        second = outbox.take_nowait()
        assert second is not None
        outbox.ack(second.seq)
    async with Outbox(path) as outbox:
        assert [m[1] for m in await drain(outbox)] == [b"a"]


async def test_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox(path) as outbox:
        await outbox.put("dt/t/x", b"secret telemetry")
        for name in ("outbox.db", "outbox.db-wal"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_concurrent_puts_share_commits(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "outbox.db", durability=Durability.FULL) as outbox:
        ids = await asyncio.gather(*(outbox.put("dt/t/x", b"p" * 100) for _ in range(2000)))
        assert len(set(ids)) == 2000
        assert outbox.transactions < 100, f"{outbox.transactions} commits for 2000 puts"
        sent = await drain(outbox)
        assert [m[2] for m in sent] == list(ids)


async def test_submit_many_commits_together_in_order(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path, limits=OutboxLimits(max_messages=10)) as outbox:
        ids = await outbox.submit_many("dt/t/x", [b"a", b"b", b"c"])
        assert [i.rsplit("-", 1)[1] for i in ids] == ["1", "2", "3"]
        with pytest.raises(OutboxFullError):
            outbox.submit_many("dt/t/x", [b"x"] * 8)
        with pytest.raises(TopicError):
            outbox.submit_many("dt/+/x", [b"x"])
        assert await asyncio.wait_for(outbox.submit_many("dt/t/x", []), 1) == []
        assert outbox.stats().depth == 3
    async with Outbox(path) as outbox:
        assert [m[1] for m in await drain(outbox)] == [b"a", b"b", b"c"]


async def test_refuse_policy_reports_and_keeps_what_it_holds(tmp_path: Path) -> None:
    lim = OutboxLimits(max_messages=3, max_bytes=200_000)
    async with Outbox(tmp_path / "o.db", limits=lim) as outbox:
        for i in range(3):
            await outbox.put("dt/t/x", bytes([i]))
        with pytest.raises(OutboxFullError):
            await outbox.put("dt/t/x", b"late")
        stats = outbox.stats()
        assert (stats.depth, stats.refused, stats.dropped) == (3, 1, 0)
        assert [m[1] for m in await drain(outbox)] == [b"\x00", b"\x01", b"\x02"]


async def test_drop_oldest_deletes_dropped_rows(tmp_path: Path) -> None:
    lim = OutboxLimits(max_messages=3, max_bytes=200_000, policy=OverflowPolicy.DROP_OLDEST)
    path = tmp_path / "o.db"
    async with Outbox(path, limits=lim) as outbox:
        for i in range(10):
            await outbox.put("dt/t/x", bytes([i]))
        assert outbox.stats().dropped == 7
    async with Outbox(path, limits=lim) as outbox:
        assert [m[1] for m in await drain(outbox)] == [b"\x07", b"\x08", b"\x09"]


async def test_payloads_beyond_the_resident_budget_are_read_back(tmp_path: Path) -> None:
    lim = OutboxLimits(resident_bytes=250, max_in_flight=100)
    async with Outbox(tmp_path / "o.db", limits=lim) as outbox:
        await asyncio.gather(
            *(outbox.submit(f"dt/t/{i % 3}", i.to_bytes(2, "big") * 50) for i in range(600))
        )
        got = []
        for _ in range(600):
            message = await outbox.next_message()
            got.append((message.topic, message.payload))
            outbox.ack(message.seq)
    assert got == [(f"dt/t/{i % 3}", i.to_bytes(2, "big") * 50) for i in range(600)]


async def test_many_senders_after_a_restart_share_reads(tmp_path: Path) -> None:
    """100 concurrent senders on a restored outbox (no payload in memory) all make progress."""
    path = tmp_path / "o.db"
    async with Outbox(path) as outbox:
        await asyncio.gather(*(outbox.submit("dt/t/x", b"%d" % i) for i in range(1000)))
    got: list[bytes] = []
    async with Outbox(path) as outbox:

        async def sender() -> None:
            while len(got) < 1000:
                message = await outbox.next_message()
                got.append(message.payload)
                await asyncio.sleep(0)
                outbox.ack(message.seq)

        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            tasks = [group.create_task(sender()) for _ in range(100)]
            await pf.wait_until(lambda: len(got) >= 1000)
            for task in tasks:
                task.cancel()
    assert sorted(got) == sorted(b"%d" % i for i in range(1000))


async def test_next_message_waits_for_a_commit_and_respects_in_flight(tmp_path: Path) -> None:
    lim = OutboxLimits(max_in_flight=1)
    async with Outbox(tmp_path / "o.db", limits=lim) as outbox:
        waiter = asyncio.create_task(outbox.next_message())
        await asyncio.sleep(0)
        assert not waiter.done()
        await outbox.put("dt/t/x", b"1")
        first = await asyncio.wait_for(waiter, 2)
        await outbox.put("dt/t/x", b"2")
        second = asyncio.create_task(outbox.next_message())
        await asyncio.sleep(0.05)
        assert not second.done(), "the in-flight bound holds the second message"
        outbox.ack(first.seq)
        assert (await asyncio.wait_for(second, 2)).payload == b"2"
        outbox.ack((await second).seq)
        await asyncio.wait_for(outbox.wait_idle(), 1)


class _CountingOutbox(Outbox):
    """Counts the senders' attempts to take a message (each wake-up of a waiting sender makes
    one)."""

    attempts = 0

    def take_nowait(self) -> StoredMessage | None:
        self.attempts += 1
        return super().take_nowait()


async def test_a_trickle_wakes_one_waiting_sender_per_message(tmp_path: Path) -> None:
    """Idle senders are not all woken by each commit and each PUBACK (a thundering herd)."""
    senders, count = 50, 20
    sent: list[bytes] = []
    async with _CountingOutbox(tmp_path / "o.db") as outbox:

        async def sender() -> None:
            while True:
                message = await outbox.next_message()
                sent.append(message.payload)
                outbox.ack(message.seq)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(sender()) for _ in range(senders)]
            for _ in range(3):
                await asyncio.sleep(0)  # every sender is waiting now
            before = outbox.attempts
            for index in range(count):
                await outbox.put("dt/t/x", f"m{index}".encode())
                for _ in range(3):
                    await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
        assert sent == [f"m{index}".encode() for index in range(count)]
        # One wake-up per message, and the sender that took it looks once more before waiting.
        assert outbox.attempts - before <= 3 * count, f"{outbox.attempts - before} attempts"


async def test_a_woken_sender_cancelled_before_it_runs_hands_the_message_on(
    tmp_path: Path,
) -> None:
    async with Outbox(tmp_path / "o.db") as outbox:
        first = asyncio.create_task(outbox.next_message())
        await asyncio.sleep(0)
        second = asyncio.create_task(outbox.next_message())
        await asyncio.sleep(0)
        # The commit wakes the oldest sender and resolves the put; this task runs first and
        # cancels that sender before it could take the message.
        await outbox.put("dt/t/x", b"only")
        assert not first.done()
        first.cancel()
        assert (await asyncio.wait_for(second, 2)).payload == b"only"
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_closing_wakes_waiting_senders(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as outbox:
        waiter = asyncio.create_task(outbox.next_message())
        await asyncio.sleep(0)
    with pytest.raises(OutboxClosedError):
        await waiter
    with pytest.raises(OutboxClosedError):
        outbox.submit("dt/t/x", b"")
    with pytest.raises(UsageError):
        async with outbox:
            pass


async def test_bad_input_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as outbox:
        with pytest.raises(TopicError):
            await outbox.put("dt/#", b"x")
        with pytest.raises(PayloadTooLargeError):
            await outbox.put("dt/t/x", b"x" * (128 * 1024 + 1))
        with pytest.raises(UsageError):
            await outbox.put("dt/t/x", b"x", qos=0)
        await outbox.put("dt/t/x", b"x" * 128 * 1024)
        assert outbox.stats().depth == 1


async def test_unopenable_database_raises_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as caught:
        async with Outbox(tmp_path / "missing-dir" / "o.db"):
            pass
    assert caught.value.operation == "open"
    not_a_db = tmp_path / "junk.db"
    not_a_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError):
        async with Outbox(not_a_db):
            pass


async def test_sigkill_while_writing_loses_no_accepted_message(tmp_path: Path) -> None:
    """A writer killed mid-stream: every id it was told "accepted" is on disk, file intact."""
    path = tmp_path / "o.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.adapters.publisher_fixtures",
        "outbox-writer",
        str(path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    accepted: list[str] = []
    try:
        async with asyncio.timeout(30):
            while len(accepted) < 3000:
                line = await child.stdout.readline()
                assert line, "the writer exited early"
                accepted.append(line.decode().strip())
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    async with Outbox(path) as outbox:
        stored = {m[2] for m in await drain(outbox)}
    assert set(accepted) <= stored
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
