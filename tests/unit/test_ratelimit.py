"""Sliding windows, throttle waits, backoff and the async rate limiter (a fake clock mostly)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_daemon.ratelimit import Backoff, RateLimiter, SlidingWindow, ThrottleRetry
from shared.errors import UsageError


def run_calls(window: SlidingWindow, count: int, *, latency: float) -> list[tuple[float, float]]:
    """Sequential calls, each started as soon as the window allows: (start, end) pairs."""
    now = 0.0
    calls = []
    for _ in range(count):
        wait = window.wait(now)
        assert wait is not None
        now += wait
        slot = window.start(now)
        now += latency
        window.finish(slot, now)
        calls.append((slot.start, now))
    return calls


def test_a_window_lets_limit_calls_through_then_waits_for_the_oldest_end() -> None:
    window = SlidingWindow(limit=3, period=1.0)
    calls = run_calls(window, 5, latency=0.01)
    assert [start for start, _ in calls] == pytest.approx([0.0, 0.01, 0.02, 1.01, 1.02])


def test_the_window_counts_a_call_until_its_answer() -> None:
    window = SlidingWindow(limit=1, period=1.0)
    slot = window.start(0.0)
    assert window.wait(5.0) is None  # in flight: it may still arrive at any moment
    window.finish(slot, 0.3)
    assert window.wait(0.3) == pytest.approx(1.0)
    assert window.wait(1.3) == 0.0


def test_a_late_call_is_made_up_by_the_next_ones() -> None:
    window = SlidingWindow(limit=15, period=1.0)
    now = 0.0
    starts = []
    for index in range(30):
        wait = window.wait(now)
        assert wait is not None
        now += wait
        slot = window.start(now)
        window.finish(slot, now + 0.005)
        starts.append(now)
        # Every call but the fifth takes 50 ms of work before the next; the fifth 300 ms.
        now += 0.3 if index == 4 else 0.05
    # An evenly spaced pacer would have lost the 250 ms; the window admits the 16th call one
    # second after the first ended, whatever happened in between.
    assert starts[15] == pytest.approx(starts[0] + 1.005)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(min_value=0.3, max_value=40),
    work=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.2), st.floats(min_value=0, max_value=0.05)),
        min_size=1,
        max_size=120,
    ),
)
def test_arrivals_anywhere_within_a_call_never_exceed_the_rate_in_any_second(
    rate: float, work: list[tuple[float, float]]
) -> None:
    window = SlidingWindow.for_rate(rate)
    now = 0.0
    calls = []
    for gap, latency in work:
        now += gap
        wait = window.wait(now)
        assert wait is not None
        now += wait
        slot = window.start(now)
        window.finish(slot, now + latency)
        calls.append((now, now + latency))
        now += latency
    # The worst case for AWS's count: every earlier call arriving as late as it could, the
    # later one as early: still at most the quota within any second (or one call per 1/rate).
    span = max(1.0, 1.0 / rate)
    allowed = max(1, int(rate)) if rate >= 1 else 1
    for index, (start, _) in enumerate(calls):
        inside = [c for c in calls[: index + 1] if c[1] > start - span + 1e-9]  # float noise
        assert len(inside) <= allowed


def test_for_rate_keeps_whole_calls_per_second() -> None:
    assert (SlidingWindow.for_rate(15.0).limit, SlidingWindow.for_rate(15.0).period) == (15, 1.0)
    assert SlidingWindow.for_rate(2.5).limit == 2
    assert SlidingWindow.for_rate(0.5).period == pytest.approx(2.0)
    assert SlidingWindow.for_rate(15.0, margin=0.01).period == pytest.approx(1.01)
    assert SlidingWindow.for_rate(15.0).slot == pytest.approx(1 / 15)


def test_a_deferred_window_lets_nothing_start_before_the_delay() -> None:
    window = SlidingWindow(limit=10, period=1.0)
    window.finish(window.start(0.0), 0.01)
    window.defer(0.05, 0.3)
    assert window.wait(0.05) == pytest.approx(0.3)
    window.defer(0.05, 0.01)  # a shorter deferral does not shorten the first
    assert window.wait(0.05) == pytest.approx(0.3)
    assert window.wait(0.35) == 0.0


def test_starting_without_room_is_a_caller_bug() -> None:
    window = SlidingWindow(limit=1, period=1.0)
    window.start(0.0)
    with pytest.raises(UsageError):
        window.start(0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0, "period": 1.0}, {"limit": 1.5, "period": 1.0}, {"limit": 1, "period": 0}],
)
def test_window_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        SlidingWindow(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan"), True])
def test_window_rate_validates(rate: float) -> None:
    with pytest.raises(UsageError):
        SlidingWindow.for_rate(rate)


def test_backoff_doubles_to_the_cap() -> None:
    backoff = Backoff(base=0.1, cap=1.0, attempts=5)
    assert [backoff.delay(n, rand=1.0) for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert backoff.delay(3, rand=0.5) == pytest.approx(0.2)
    assert backoff.delay(3, rand=0.0) == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"base": 0}, {"cap": 0.01, "base": 0.1}, {"attempts": 0}, {"attempts": 1.5}]
)
def test_backoff_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_a_throttle_waits_one_slot_then_doubles_to_the_cap() -> None:
    retry = ThrottleRetry(attempts=8, cap=1.0, jitter=0.5)
    slot = 1 / 15
    assert [retry.delay(n, slot=slot, rand=0.0) for n in range(1, 6)] == pytest.approx(
        [slot, 2 * slot, 4 * slot, 8 * slot, 1.0]
    )
    assert retry.delay(1, slot=slot, rand=0.999) == pytest.approx(1.4995 * slot)
    assert retry.delay(100, slot=slot, rand=0.5) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"attempts": 2.0}, {"cap": 0}, {"jitter": -0.1}, {"jitter": 1.5}],
)
def test_throttle_retry_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        ThrottleRetry(**kwargs)  # type: ignore[arg-type]


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_limiter_keeps_one_window_per_api() -> None:
    fake = FakeTime()
    limiter = RateLimiter(
        default_tps=1.0,
        per_api={"CreateThing": 2.0},
        margin=0.0,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert limiter.limit_for("CreateThing") == 2.0
    assert limiter.limit_for("AttachPolicy") == 1.0
    for api, expected in [
        ("AttachPolicy", 0.0),
        ("CreateThing", 0.0),
        ("CreateThing", 0.0),
        ("AttachPolicy", 1.0),
        ("CreateThing", 0.0),  # the second waited for AttachPolicy: its window moved on
    ]:
        async with limiter.call(api) as waited:
            assert waited == pytest.approx(expected)
    assert fake.slept == [pytest.approx(1.0)]


async def test_limiter_paces_by_its_margin() -> None:
    fake = FakeTime()
    limiter = RateLimiter(default_tps=15.0, margin=0.02, clock=fake.clock, sleep=fake.sleep)
    for _ in range(16):
        async with limiter.call("CreateThing"):
            fake.now += 0.01  # each call takes 10 ms to answer
    # The 16th call started 1.02 s after the first one's answer.
    assert fake.now - 0.01 == pytest.approx(0.01 + 1.02)


async def test_a_throttled_api_waits_one_slot_before_its_next_call() -> None:
    fake = FakeTime()
    limiter = RateLimiter(default_tps=10.0, margin=0.0, clock=fake.clock, sleep=fake.sleep)
    retry = ThrottleRetry(jitter=0.0)
    async with limiter.call("AttachPolicy"):
        fake.now += 0.01
    delay = limiter.throttled("AttachPolicy", attempt=1, retry=retry, rand=0.7)
    assert delay == pytest.approx(0.1)
    async with limiter.call("AttachPolicy") as waited:
        assert waited == pytest.approx(0.1)
    # A second throttle of the same call waits twice as long; other APIs are not held back.
    limiter.throttled("AttachPolicy", attempt=2, retry=retry, rand=0.7)
    async with limiter.call("AttachPolicy") as waited:
        assert waited == pytest.approx(0.2)
    async with limiter.call("CreateThing") as waited:
        assert waited == 0.0


async def test_limiter_really_paces_concurrent_calls_until_they_end() -> None:
    limiter = RateLimiter(default_tps=5.0, margin=0.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    starts: list[float] = []
    ends: list[float] = []

    async def one() -> None:
        async with limiter.call("CreateCertificateFromCsr"):
            starts.append(loop.time() - start)
            await asyncio.sleep(0.05)
            ends.append(loop.time() - start)

    await asyncio.gather(*(one() for _ in range(7)))
    # Five at once (all five in flight before the first one ends), the sixth and seventh only
    # one second after the ends of earlier calls. Only lower bounds on time: a slow machine
    # makes calls later, never earlier.
    assert max(starts[:5]) < min(ends)
    assert starts[5] >= min(ends) + 1.0 - 0.01
    assert starts[6] >= sorted(ends)[1] + 1.0 - 0.01


async def test_a_cancelled_call_still_counts_and_frees_its_turn() -> None:
    fake = FakeTime()
    limiter = RateLimiter(default_tps=1.0, margin=0.0, clock=fake.clock, sleep=fake.sleep)

    async def cancelled_call() -> None:
        async with limiter.call("CreateThing"):
            fake.now += 0.2
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await cancelled_call()
    async with limiter.call("CreateThing") as waited:
        assert waited == pytest.approx(1.0)


@pytest.mark.parametrize("margin", [-0.01, 0.6, float("nan"), True])
def test_limiter_validates_its_margin(margin: float) -> None:
    with pytest.raises(UsageError):
        RateLimiter(margin=margin)


def test_limiter_validates_rates() -> None:
    with pytest.raises(UsageError):
        RateLimiter(default_tps=0)
    with pytest.raises(UsageError):
        RateLimiter(per_api={"CreateThing": -1.0})
