"""Token buckets, backoff and the async rate limiter (a fake clock; nothing really waits)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_daemon.ratelimit import Backoff, RateLimiter, ThrottleRetry, TokenBucket
from shared.errors import UsageError


def test_by_default_calls_are_spaced_evenly() -> None:
    bucket = TokenBucket(rate=15.0, now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(4)]
    assert waits == pytest.approx([0.0, 1 / 15, 2 / 15, 3 / 15])


def test_a_full_bucket_allows_a_burst_then_spaces_calls() -> None:
    bucket = TokenBucket(rate=15.0, burst=15.0, now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(17)]
    assert waits[:15] == [0.0] * 15
    assert waits[15] == pytest.approx(1 / 15)
    assert waits[16] == pytest.approx(2 / 15)


def test_tokens_come_back_with_time_but_not_beyond_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(0.5)
    assert bucket.reserve(100.0) == 0.0
    assert bucket.reserve(100.0) == 0.0
    assert bucket.reserve(100.0) == pytest.approx(0.5)


def test_a_clock_going_backwards_does_not_mint_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, now=10.0)
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(5.0) == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=200),
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_calls_started_never_exceed_rate_times_window_plus_burst(
    rate: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, now=0.0)
    now = 0.0
    starts = []
    for gap in gaps:
        now += gap
        starts.append(now + bucket.reserve(now))
    span = max(starts) - min(starts)
    assert len(starts) <= bucket.burst + rate * span + 1e-6


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan"), True])
def test_bucket_rate_validates(rate: float) -> None:
    with pytest.raises(UsageError):
        TokenBucket(rate=rate, now=0.0)


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


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_limiter_keeps_one_bucket_per_api() -> None:
    fake = FakeTime()
    limiter = RateLimiter(
        default_tps=2.0,
        per_api={"CreateThing": 4.0},
        margin=0.0,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert limiter.limit_for("CreateThing") == 4.0
    assert limiter.limit_for("AttachPolicy") == 2.0
    assert await limiter.acquire("AttachPolicy") == 0.0
    assert await limiter.acquire("CreateThing") == 0.0
    assert await limiter.acquire("AttachPolicy") == pytest.approx(0.5)
    # The 0.5 s slept for AttachPolicy refilled CreateThing's token: no wait.
    assert await limiter.acquire("CreateThing") == 0.0
    assert await limiter.acquire("CreateThing") == pytest.approx(0.25)
    assert fake.slept == [pytest.approx(0.5), pytest.approx(0.25)]


async def test_limiter_really_paces_calls() -> None:
    limiter = RateLimiter(default_tps=50.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(limiter.acquire("CreateCertificateFromCsr") for _ in range(11)))
    # One at once, then ten more at 50 per second: about 0.2 s.
    assert 0.15 <= loop.time() - start < 1.0


def test_a_deferred_bucket_hands_out_nothing_before_the_delay() -> None:
    bucket = TokenBucket(rate=10.0, now=0.0)
    assert bucket.reserve(0.0) == 0.0
    bucket.defer(0.05, 0.3)
    assert bucket.reserve(0.05) == pytest.approx(0.3)
    assert bucket.reserve(0.05) == pytest.approx(0.4)  # the queue behind it keeps its spacing
    # A deferral shorter than the queue already waiting changes nothing.
    bucket.defer(0.05, 0.01)
    assert bucket.reserve(0.05) == pytest.approx(0.5)


def test_a_deferred_bucket_refills_after_the_delay() -> None:
    bucket = TokenBucket(rate=10.0, now=0.0)
    bucket.defer(0.0, 0.2)
    assert bucket.reserve(0.2) == pytest.approx(0.0)
    assert bucket.reserve(0.2) == pytest.approx(0.1)


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


async def test_limiter_paces_under_the_quota_by_its_margin() -> None:
    fake = FakeTime()
    limiter = RateLimiter(default_tps=15.0, margin=0.025, clock=fake.clock, sleep=fake.sleep)
    assert limiter.limit_for("CreateThing") == 15.0  # what a throttle names
    assert limiter.pace_for("CreateThing") == pytest.approx(14.625)
    for _ in range(16):
        await limiter.acquire("CreateThing")
    # 16 calls span 15 slots at 14.625 per second: more than the one second AWS counts.
    assert fake.now == pytest.approx(15 / 14.625)
    assert fake.now > 1.0


async def test_a_throttled_api_waits_one_slot_before_its_next_call() -> None:
    fake = FakeTime()
    limiter = RateLimiter(default_tps=10.0, margin=0.0, clock=fake.clock, sleep=fake.sleep)
    retry = ThrottleRetry(jitter=0.0)
    assert await limiter.acquire("AttachPolicy") == 0.0
    fake.now += 0.5  # the call ran; its token came back meanwhile
    delay = limiter.throttled("AttachPolicy", attempt=1, retry=retry, rand=0.7)
    assert delay == pytest.approx(0.1)
    assert await limiter.acquire("AttachPolicy") == pytest.approx(0.1)
    # A second throttle of the same call waits twice as long; other APIs are not held back.
    delay = limiter.throttled("AttachPolicy", attempt=2, retry=retry, rand=0.7)
    assert await limiter.acquire("AttachPolicy") == pytest.approx(0.2)
    assert await limiter.acquire("CreateThing") == 0.0


@pytest.mark.parametrize("margin", [-0.01, 0.6, float("nan"), True])
def test_limiter_validates_its_margin(margin: float) -> None:
    with pytest.raises(UsageError):
        RateLimiter(margin=margin)


def test_limiter_validates_rates() -> None:
    with pytest.raises(UsageError):
        RateLimiter(default_tps=0)
    with pytest.raises(UsageError):
        RateLimiter(per_api={"CreateThing": -1.0})
