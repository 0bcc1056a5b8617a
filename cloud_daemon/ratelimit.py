"""Rate limits for AWS IoT: a sliding window per API, and the wait after a throttle.

AWS IoT allows 15 transactions per second for each of CreateCertificateFromCsr, CreateThing,
AttachThingPrincipal and AttachPolicy (some accounts 100; DESIGN.md §4). Staying under the
limit is cheaper than being throttled, so every call first waits for room in its API's window.

AWS, like the sandbox, counts calls in a sliding second, each at the moment it arrives. We do
not know that moment, only that it falls between the call's start and its answer. So
:class:`SlidingWindow` counts each call from its start (for the call about to be made) to its
end (for the calls made before): a call may start once the call ``limit`` places back ended at
least one period ago, which no arrival jitter can turn into a ``limit + 1``-th call within one
of AWS's seconds. The guard this leaves is one call's latency per ``limit`` calls, instead of a
guessed margin, and a period lost (a slow record, a pause of the event loop) is made up by the
calls after it, which an evenly spaced pacer would lose for good. ``margin`` (0.5 % by default)
stretches the period further, for a clock or a counting rule of AWS's that differs.

A throttle that still happens (another client in the same account, an account quota lower than
configured) is answered by :meth:`RateLimiter.throttled`: the API's window admits nothing for
one slot (``period / limit``), doubling with each throttle of the same call
(:class:`ThrottleRetry`), so a one-off throttle costs about one slot, not a long jittered
backoff, while repeated ones back off far enough for a lower quota to be met. Every caller of
that API waits behind the throttled call, as they would all be refused.

:class:`SlidingWindow` is the pure core (the time is passed in); :class:`RateLimiter` is the
async driver, with the clock and the sleep handed in so tests need not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from shared.backoff import full_jitter_delay
from shared.errors import UsageError

__all__ = [
    "DEFAULT_IOT_TPS",
    "DEFAULT_MARGIN",
    "Backoff",
    "CallSlot",
    "RateLimiter",
    "SlidingWindow",
    "ThrottleRetry",
]

DEFAULT_IOT_TPS: Final = 15.0
DEFAULT_MARGIN: Final = 0.005
"""How much longer than AWS's second the window's period is (0.5 %)."""
_MAX_DOUBLINGS: Final = 62


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{name} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive, finite number")
    return float(value)


@dataclass(slots=True)
class CallSlot:
    """One call counted by a :class:`SlidingWindow`: when it started, and when it ended.

    Attributes:
        start: when the call was let through.
        end: when its answer came (``None`` while it is in flight).
    """

    start: float
    end: float | None = None


class SlidingWindow:
    """At most ``limit`` calls in any ``period`` seconds, each counted from start to end. Pure.

    Args:
        limit: calls allowed per period (>= 1).
        period: the window's length in seconds.

    Raises:
        UsageError: ``limit`` is not a positive integer, or ``period`` not a positive number.
    """

    def __init__(self, *, limit: int, period: float) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError("limit must be a positive integer")
        self.limit = limit
        self.period = _check_positive("period", period)
        self._calls: deque[CallSlot] = deque(maxlen=limit)
        self._not_before = -math.inf

    @classmethod
    def for_rate(cls, rate: float, *, margin: float = 0.0) -> SlidingWindow:
        """The window that keeps calls within ``rate`` per second in every sliding second.

        Args:
            rate: calls per second (>= 1: ``floor(rate)`` per second; below 1: one call per
                ``1 / rate`` seconds).
            margin: the fraction the period is stretched by.

        Returns:
            The window.

        Raises:
            UsageError: ``rate`` is not a positive number.
        """
        rate = _check_positive("rate", rate)
        limit, period = (math.floor(rate), 1.0) if rate >= 1 else (1, 1.0 / rate)
        return cls(limit=limit, period=period * (1.0 + margin))

    @property
    def slot(self) -> float:
        """One call's share of the period (``period / limit``)."""
        return self.period / self.limit

    def wait(self, now: float) -> float | None:
        """How long until a call may start.

        Args:
            now: the current time.

        Returns:
            Seconds to wait (0.0: start it now), or ``None`` while the call ``limit`` places
            back is still in flight (ask again once a call ends).
        """
        held = max(0.0, self._not_before - now)
        if len(self._calls) < self.limit:
            return held
        end = self._calls[0].end
        if end is None:
            return None
        return max(held, end + self.period - now)

    def start(self, now: float) -> CallSlot:
        """Count a call starting now (after :meth:`wait` said 0).

        Args:
            now: the current time.

        Returns:
            The slot to :meth:`finish` when the call's answer comes.

        Raises:
            UsageError: the window has no room now (a caller bug).
        """
        if self.wait(now) != 0.0:
            raise UsageError("SlidingWindow.start() without room: wait() first")
        slot = CallSlot(now)
        self._calls.append(slot)
        return slot

    @staticmethod
    def finish(slot: CallSlot, now: float) -> None:
        """The call's answer came (or it failed, or was cancelled) at ``now``."""
        if slot.end is None:
            slot.end = max(slot.start, now)

    def defer(self, now: float, delay: float) -> None:
        """Let no call start before ``now + delay`` (the API refused one: its window is full).

        Args:
            now: the current time.
            delay: seconds (negative counts as 0).
        """
        self._not_before = max(self._not_before, now + max(0.0, delay))


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
    """One sliding window per API name, created on first use, keeping each API within its quota.

    Args:
        default_tps: the quota of an API without an override (AWS IoT: 15).
        per_api: overrides, by operation name (``{"CreateThing": 100.0}``).
        margin: the fraction the window's period is stretched by (0.005: 15 calls per
            1.005 s at most); 0 keeps the quota's own second.
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
    _windows: dict[str, SlidingWindow] = field(default_factory=dict, init=False, repr=False)
    _turns: dict[str, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)
    _ended: dict[str, asyncio.Event] = field(default_factory=dict, init=False, repr=False)

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

    def window_for(self, api: str) -> SlidingWindow:
        """The window that paces ``api`` (created on first use)."""
        window = self._windows.get(api)
        if window is None:
            window = SlidingWindow.for_rate(self.limit_for(api), margin=self.margin)
            self._windows[api] = window
            self._turns[api] = asyncio.Lock()
            self._ended[api] = asyncio.Event()
        return window

    @contextlib.asynccontextmanager
    async def call(self, api: str) -> AsyncIterator[float]:
        """Wait for room in ``api``'s window, and count the call made in the ``async with``.

        Callers wait their turn in arrival order. The call counts until the block is left
        (answered, failed or cancelled).

        Args:
            api: the operation name (``CreateCertificateFromCsr``).

        Yields:
            The seconds waited.
        """
        window = self.window_for(api)
        ended = self._ended[api]
        waited = 0.0
        async with self._turns[api]:
            while (wait := window.wait(self.clock())) != 0.0:
                if wait is None:
                    # The call that bounds this one is in flight: its end sets the event.
                    ended.clear()
                    started = self.clock()
                    await ended.wait()
                    waited += self.clock() - started
                else:
                    await self.sleep(wait)
                    waited += wait
            slot = window.start(self.clock())
        try:
            yield waited
        finally:
            window.finish(slot, self.clock())
            ended.set()

    def throttled(self, api: str, *, attempt: int, retry: ThrottleRetry, rand: float) -> float:
        """AWS refused a call to ``api`` (ThrottlingException): hold its next call back.

        The retry goes through :meth:`call` again: it waits out the returned delay, behind
        calls already waiting their turn.

        Args:
            api: the operation name.
            attempt: how many tries of this call were throttled so far (>= 1).
            retry: the retry policy.
            rand: a uniform draw in [0, 1).

        Returns:
            The seconds before the API's next call (for the log).
        """
        window = self.window_for(api)
        delay = retry.delay(attempt, slot=window.slot, rand=rand)
        window.defer(self.clock(), delay)
        return delay
