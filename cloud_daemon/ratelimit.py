"""Rate limits for AWS IoT: a token bucket per API, and the backoff after a throttle.

AWS IoT allows 15 transactions per second for each of CreateCertificateFromCsr, CreateThing,
AttachThingPrincipal and AttachPolicy (some accounts 100; DESIGN.md §4). Staying under the
limit is cheaper than being throttled, so every call first takes a token from its API's bucket;
a ThrottlingException that still happens (another client in the same account) is answered with
exponential backoff and full jitter, and the log names the API and the limit in force.

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
    "Backoff",
    "RateLimiter",
    "TokenBucket",
]

DEFAULT_IOT_TPS: Final = 15.0


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


@dataclass(slots=True)
class RateLimiter:
    """One token bucket per API name, created on first use.

    Args:
        default_tps: the rate for an API without an override (AWS IoT: 15).
        per_api: overrides, by operation name (``{"CreateThing": 100.0}``).
        clock: a monotonic clock in seconds.
        sleep: how to wait (``asyncio.sleep``; tests may record instead).

    Raises:
        UsageError: a rate is not a positive number.
    """

    default_tps: float = DEFAULT_IOT_TPS
    per_api: Mapping[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_positive("default_tps", self.default_tps)
        for api, rate in self.per_api.items():
            _check_positive(f"per_api[{api!r}]", rate)
        self.per_api = dict(self.per_api)

    def limit_for(self, api: str) -> float:
        """The rate in force for ``api``, in transactions per second."""
        return self.per_api.get(api, self.default_tps)

    async def acquire(self, api: str) -> float:
        """Wait until a call to ``api`` fits its rate.

        Args:
            api: the operation name (``CreateCertificateFromCsr``).

        Returns:
            The seconds waited.
        """
        bucket = self._buckets.get(api)
        if bucket is None:
            bucket = TokenBucket(rate=self.limit_for(api), now=self.clock())
            self._buckets[api] = bucket
        wait = bucket.reserve(self.clock())
        if wait > 0:
            await self.sleep(wait)
        return wait
