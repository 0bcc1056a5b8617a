"""Exponential backoff with full jitter, the one formula every retry loop of the project uses.

The wait after the ``attempt``-th failure is drawn uniformly from ``[0, ceiling)``, where the
ceiling starts at ``base``, doubles with each failure, and stops growing at ``cap``. Full jitter
(rather than a fixed or "equal" jitter) spreads a fleet's retries out the most after a shared
outage, which is what AWS's own guidance and quotas such as one CONNECT per second per client id
call for.

Pure: the uniform draw is passed in, so callers choose their random source (a seeded
:class:`random.Random` in tests) and the formula stays deterministic.
"""

from __future__ import annotations

from typing import Final

__all__ = ["full_jitter_delay"]

# 2**62 times any sensible base is far beyond any cap; the clamp only keeps a huge attempt
# count from overflowing the float.
_MAX_DOUBLINGS: Final = 62


def full_jitter_delay(attempt: int, *, base: float, cap: float, rand: float) -> float:
    """The wait after failure number ``attempt``: ``rand * min(cap, base * 2**(attempt - 1))``.

    Args:
        attempt: how many tries failed so far (1 for the first failure; 0 or less counts as 1).
        base: the first ceiling, seconds.
        cap: the largest ceiling, seconds.
        rand: a uniform draw in ``[0, 1)`` (``rng.random()``); ``rng.uniform(0, c)`` draws the
            same number as ``c * rng.random()``, so a seeded source gives the same waits either way.

    Returns:
        Seconds to wait, in ``[0, min(cap, base * 2**(attempt - 1)))``.
    """
    doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
    return rand * min(cap, base * 2.0**doublings)
