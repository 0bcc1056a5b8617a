"""Rate limits for AWS IoT: a token bucket per API, and the backoff after a throttle.

AWS IoT allows 15 transactions per second for each of CreateCertificateFromCsr, CreateThing,
AttachThingPrincipal and AttachPolicy (some accounts 100; DESIGN.md §4). Staying under the
limit is cheaper than being throttled, so every call first takes a token from its API's bucket.

The buckets pace a little under the quota (``margin``, 2.5 % by default). AWS, like the
sandbox, counts calls in a sliding second on arrival: paced at exactly the quota, any jitter
between our send and their count puts a 16th call into some second, and that call's slot is
lost. A throttle that still happens (jitter beyond the margin, another client in the same
account, an account quota lower than configured) is answered by :meth:`RateLimiter.throttled`:
the API's bucket hands out its next token only after a wait of one slot, doubling with each
throttle of the same call (:class:`ThrottleRetry`), so a one-off throttle costs about one slot,
not a long jittered backoff, while repeated ones back off far enough for a lower quota to be
met. Every caller of that API waits behind the throttled call, as they would all be refused.

:class:`TokenBucket` is the pure core (the time is passed in); :class:`RateLimiter` is the
async driver, with the clock and the sleep handed in so tests need not wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from shared.backoff import full_jitter_delay
from shared.errors import UsageError

__all__ = [
    "DEFAULT_IOT_TPS",
    "DEFAULT_MARGIN",
    "Backoff",
    "RateLimiter",
    "ThrottleRetry",
    "TokenBucket",
]

DEFAULT_IOT_TPS: Final = 15.0
DEFAULT_MARGIN: Final = 0.025
"""The fraction of each quota left unused, so arrival jitter does not overrun a sliding second."""
_MAX_DOUBLINGS: Final = 62


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{name} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive, finite number")
    return float(value)


class TokenBucket:
    """A token bucket that hands out reservations: pure, the time passed in.

    A call to :meth:`reserve` always succeeds and returns how long the caller must wait before
    acting. The balance may go negative, so concurrent callers queue in arrival order, each
    waiting one token's time after the one before, and a burst never exceeds ``burst``.

    Args:
        rate: tokens per second.
        burst: the bucket's capacity. The default, 1, spaces calls evenly ``1 / rate`` apart:
            AWS does not publish IoT's burst allowance, and a full second's burst on top of
            the rate could put ``2 * rate`` calls into one second.
        now: the time the bucket starts, full.

    Raises:
        UsageError: ``rate`` or ``burst`` is not a positive number.
    """

    def __init__(self, *, rate: float, burst: float | None = None, now: float) -> None:
        self.rate = _check_positive("rate", rate)
        self.burst = 1.0 if burst is None else _check_positive("burst", burst)
        self._tokens = self.burst
        self._stamp = now

    def reserve(self, now: float) -> float:
        """Take one token.

        Args:
            now: the current time, on the clock given at construction.

        Returns:
            Seconds to wait before the call this token pays for (0.0 when one was available).
        """
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = max(self._stamp, now)
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def defer(self, now: float, delay: float) -> None:
        """Hand out no token before ``now + delay`` (the API refused a call: its window is full).

        Reservations already made keep their times; the next :meth:`reserve` at ``now`` waits
        at least ``delay``, and those after it one token's time more each.

        Args:
            now: the current time.
            delay: seconds (negative counts as 0).
        """
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = max(self._stamp, now)
        self._tokens = min(self._tokens, 1.0 - max(0.0, delay) * self.rate)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter, for throttled or failed calls.

    Attributes:
        base: the first ceiling, in seconds.
        cap: the largest ceiling.
        attempts: how many tries in all before giving up (the first one included).

    Raises:
        UsageError: a non-positive value, or ``cap < base``.
    """

    base: float = 0.1
    cap: float = 5.0
    attempts: int = 6

    def __post_init__(self) -> None:
        _check_positive("Backoff.base", self.base)
        _check_positive("Backoff.cap", self.cap)
        if self.cap < self.base:
            raise UsageError("Backoff.cap must be >= base")
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise UsageError("Backoff.attempts must be an integer")
        if self.attempts < 1:
            raise UsageError("Backoff.attempts must be >= 1")

    def delay(self, attempt: int, *, rand: float) -> float:
        """The wait after failed try number ``attempt`` (1 for the first failure).

        Args:
            attempt: the number of tries that failed so far (>= 1).
            rand: a uniform draw in [0, 1) (passed in, so the core stays deterministic).

        Returns:
            ``rand * min(cap, base * 2 ** (attempt - 1))``.
        """
        return full_jitter_delay(attempt, base=self.base, cap=self.cap, rand=rand)


@dataclass(frozen=True, slots=True)
class ThrottleRetry:
    """How a throttled call waits and retries: one slot at first, doubling, with a little jitter.

    Attributes:
        attempts: how many tries in all before giving up (the first one included).
        cap: the longest wait after one throttle, in seconds.
        jitter: the fraction of a wait added at random (0.5: from 1x to 1.5x), so several
            workers throttled together do not come back in the same instant.

    Raises:
        UsageError: ``attempts`` below 1, a non-positive ``cap``, ``jitter`` outside [0, 1].
    """

    attempts: int = 8
    cap: float = 5.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise UsageError("ThrottleRetry.attempts must be an integer")
        if self.attempts < 1:
            raise UsageError("ThrottleRetry.attempts must be >= 1")
        _check_positive("ThrottleRetry.cap", self.cap)
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int | float):
            raise UsageError("ThrottleRetry.jitter must be a number")
        if not 0.0 <= self.jitter <= 1.0:
            raise UsageError("ThrottleRetry.jitter must be within [0, 1]")

    def delay(self, attempt: int, *, slot: float, rand: float) -> float:
        """The wait after throttle number ``attempt`` of one call.

        Args:
            attempt: the number of tries throttled so far (>= 1).
            slot: one token's time at the paced rate (``1 / rate``).
            rand: a uniform draw in [0, 1).

        Returns:
            ``min(cap, slot * 2 ** (attempt - 1) * (1 + jitter * rand))``.
        """
        doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
        return min(self.cap, slot * 2.0**doublings * (1.0 + self.jitter * rand))


@dataclass(slots=True)
class RateLimiter:
    """One token bucket per API name, created on first use, pacing under each quota.

    Args:
        default_tps: the quota of an API without an override (AWS IoT: 15).
        per_api: overrides, by operation name (``{"CreateThing": 100.0}``).
        margin: the fraction of each quota left unused (0.025: 15 TPS is paced at 14.625);
            0 paces at the quota itself.
        clock: a monotonic clock in seconds.
        sleep: how to wait (``asyncio.sleep``; tests may record instead).

    Raises:
        UsageError: a rate is not a positive number, or ``margin`` is outside [0, 0.5].
    """

    default_tps: float = DEFAULT_IOT_TPS
    per_api: Mapping[str, float] = field(default_factory=dict)
    margin: float = DEFAULT_MARGIN
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_positive("default_tps", self.default_tps)
        for api, rate in self.per_api.items():
            _check_positive(f"per_api[{api!r}]", rate)
        self.per_api = dict(self.per_api)
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float):
            raise UsageError("margin must be a number")
        # Beyond half the quota a "margin" is a misconfigured rate, better said as one.
        if not 0.0 <= self.margin <= 0.5:
            raise UsageError("margin must be within [0, 0.5]")

    def limit_for(self, api: str) -> float:
        """The quota for ``api``, in transactions per second (what a throttle log names)."""
        return self.per_api.get(api, self.default_tps)

    def pace_for(self, api: str) -> float:
        """The rate calls to ``api`` are paced at: its quota less the margin."""
        return self.limit_for(api) * (1.0 - self.margin)

    def _bucket(self, api: str) -> TokenBucket:
        bucket = self._buckets.get(api)
        if bucket is None:
            bucket = TokenBucket(rate=self.pace_for(api), now=self.clock())
            self._buckets[api] = bucket
        return bucket

    def throttled(self, api: str, *, attempt: int, retry: ThrottleRetry, rand: float) -> float:
        """AWS refused a call to ``api`` (ThrottlingException): hold its next token back.

        Call :meth:`acquire` again before retrying: it waits out the returned delay, behind
        calls that had already reserved their slot.

        Args:
            api: the operation name.
            attempt: how many tries of this call were throttled so far (>= 1).
            retry: the retry policy.
            rand: a uniform draw in [0, 1).

        Returns:
            The seconds before the API's next token (for the log).
        """
        bucket = self._bucket(api)
        delay = retry.delay(attempt, slot=1.0 / bucket.rate, rand=rand)
        bucket.defer(self.clock(), delay)
        return delay

    async def acquire(self, api: str) -> float:
        """Wait until a call to ``api`` fits its rate.

        Args:
            api: the operation name (``CreateCertificateFromCsr``).

        Returns:
            The seconds waited.
        """
        wait = self._bucket(api).reserve(self.clock())
        if wait > 0:
            await self.sleep(wait)
        return wait
