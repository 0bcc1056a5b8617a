"""One gateway, start → certificate stored: p50 and p99 over many runs, one gateway at a time.

Run ``python -m bench.single [--quick] [--json]`` (or the whole suite, ``python -m bench``).

Same set-up as :mod:`bench.fleet` (sandbox with IoT throttling at 15 TPS, a real ``ztp-cloud``
process, the device side in a warm child process), but gateways go one after another: each run
registers a fresh gateway and starts its supervisor (:func:`ztp_daemon.supervisor.serve`), and
is timed from that start (key made, CSR built, AirVantage MQTT connect, request sent) to the
daemon's ``provisioned`` event (certificate delivered in fragments, verified, stored). The
interpreter's start-up and imports are outside the window: a gateway's daemon pays them once at
boot, not per provisioning.

Goals: p50 ≤ 0.35 s, p99 ≤ 1.0 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import median
from bench.fleet import CloudDaemon, DeviceFleet, bench_sandbox, quiet_logs
from sandbox.world import Sandbox

__all__ = ["SingleResult", "main", "run_single"]

P50_GOAL = 0.35
P99_GOAL = 1.0


@dataclass(frozen=True, slots=True)
class SingleResult:
    """The single-gateway figures."""

    runs: int
    failures: int
    p50_seconds: float
    p99_seconds: float
    min_seconds: float
    max_seconds: float
    latencies: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""
        return {
            "single_runs": self.runs,
            "single_failures": self.failures,
            "single_p50_seconds": round(self.p50_seconds, 3),
            "single_p99_seconds": round(self.p99_seconds, 3),
            "single_min_seconds": round(self.min_seconds, 3),
            "single_max_seconds": round(self.max_seconds, 3),
        }


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with ``fraction`` of the values at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


async def run_single(
    sandbox: Sandbox, fleet: DeviceFleet, *, runs: int, log: Callable[[str], None]
) -> SingleResult:
    """Provision ``runs`` fresh gateways one at a time; time each.

    Args:
        sandbox: the running sandbox.
        fleet: the device child.
        runs: how many gateways.
        log: progress lines.

    Returns:
        The figures (a failed run counts as infinitely slow in the percentiles).
    """
    # One warm-up gateway, not counted: the cloud's first AirVantage token and DescribeEndpoint.
    [warm] = await sandbox.add_devices(1)
    await fleet.burst([warm], within=30.0)
    latencies: list[float] = []
    failures = 0
    for _ in range(runs):
        [gateway] = await sandbox.add_devices(1)
        burst = await fleet.burst([gateway], within=30.0)
        if gateway.serial in burst.latencies:
            latencies.append(burst.latencies[gateway.serial])
        else:
            failures += 1
            latencies.append(math.inf)
    result = SingleResult(
        runs=runs,
        failures=failures,
        p50_seconds=_percentile(latencies, 0.5),
        p99_seconds=_percentile(latencies, 0.99),
        min_seconds=min(latencies),
        max_seconds=max(latencies),
        latencies=tuple(latencies),
    )
    log(
        f"single: {runs} runs, p50 {result.p50_seconds:.3f} s, p99 {result.p99_seconds:.3f} s, "
        f"median {median(latencies):.3f} s, {failures} failures"
    )
    return result


async def _standalone(*, quick: bool, log: Callable[[str], None]) -> SingleResult:
    with tempfile.TemporaryDirectory(prefix="ztp-bench-single-", dir="/tmp") as tmp:
        work = Path(tmp)
        async with (
            bench_sandbox(work / "sandbox") as sandbox,
            CloudDaemon(sandbox, work / "cloud"),
            DeviceFleet(sandbox, work / "devices") as fleet,
        ):
            return await run_single(sandbox, fleet, runs=20 if quick else 50, log=log)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.single [--quick] [--json]``.

    Returns:
        0 when every run provisioned, 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.single", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 runs instead of 50")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args(argv)
    quiet_logs()
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    result = asyncio.run(_standalone(quick=options.quick, log=log))
    print(json.dumps(result.to_json(), indent=None if options.json else 2))
    return 0 if result.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
