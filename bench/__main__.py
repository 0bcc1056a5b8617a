"""The benchmark suite: ``python -m bench [--quick] [--json] [--write BENCHMARKS.md]``.

Every figure is a ratio (or a latency) measured side by side in this one run:

1. one sandbox (IoT throttled at 15 TPS per API), one real ``ztp-cloud``, the device side in a
   child process: :mod:`bench.single` (one gateway at a time, p50/p99), :mod:`bench.fleet`
   (N gateways at once: wall ÷ (N/15 s), and the cloud daemon's CPU per gateway), and
   :mod:`bench.cloud_cpu` (the same IoT calls from a plain aiobotocore loop: the CPU baseline);
2. :mod:`bench.outbox` (outbox + publisher vs raw aiomqtt; daemon RSS vs the import floor);
3. :mod:`bench.kinesis` (our consumer vs a bare GetRecords loop and async-kinesis).

``--quick`` (under a minute): N = 60, 20 single runs, and the other benchmarks' quick plans.
``--json`` prints one JSON object; ``--write FILE`` also renders the figures as Markdown, with
the machine, the command and the date, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from bench import kinesis as kinesis_bench
from bench import outbox as outbox_bench
from bench.cloud_cpu import GOAL as CPU_GOAL
from bench.cloud_cpu import profile_cloud, run_bare
from bench.fleet import CloudDaemon, DeviceFleet, bench_sandbox, quiet_logs, run_fleet
from bench.single import P50_GOAL, P99_GOAL, run_single

__all__ = ["GOALS", "main", "render_markdown", "run_suite"]

#: (figure, goal, "<=" or ">="): what each headline figure is held to.
GOALS: Final[tuple[tuple[str, float, str], ...]] = (
    ("fleet_quota_ratio", 1.05, "<="),
    ("single_p50_seconds", P50_GOAL, "<="),
    ("single_p99_seconds", P99_GOAL, "<="),
    # The consumer's goals as issue #6 sets them (bench.kinesis reports the same).
    ("kinesis_vs_bare_loop", 0.95, ">="),
    ("kinesis_vs_async_kinesis", 1.0, ">="),
    ("kinesis_cpu_vs_async_kinesis", 0.5, "<="),
    ("outbox_vs_raw_aiomqtt", 0.8, ">="),
    ("rss_vs_import_floor", 1.25, "<="),
    ("cloud_cpu_vs_bare_calls", CPU_GOAL, "<="),
)


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    fleet_devices: int
    single_runs: int
    bare_devices: int
    profile_devices: int
    outbox: Mapping[str, int]
    kinesis: kinesis_bench.Plan

    @classmethod
    def of(cls, *, quick: bool) -> _Plan:
        if quick:
            return cls(
                fleet_devices=60,
                single_runs=20,
                bare_devices=60,
                profile_devices=0,
                outbox={"count": 5000, "repetitions": 3, "memory_runs": 1},
                # Lighter than bench.kinesis's own quick plan, to keep the suite under a minute.
                kinesis=kinesis_bench.Plan(
                    repetitions=3, records={1: 5_000, 4: 10_000}, keep_up_seconds=3.0
                ),
            )
        return cls(
            fleet_devices=1000,
            single_runs=50,
            bare_devices=300,
            profile_devices=200,
            outbox={"count": 20000, "repetitions": 5, "memory_runs": 3},
            kinesis=kinesis_bench.Plan.of(quick=False),
        )


def _ratio(numerator: float, denominator: float) -> float | None:
    if not denominator or math.isnan(numerator) or math.isinf(numerator):
        return None
    return round(numerator / denominator, 3)


async def _provisioning(plan: _Plan, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ztp-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        async with (
            bench_sandbox(work / "sandbox") as sandbox,
            CloudDaemon(sandbox, work / "cloud") as cloud,
            DeviceFleet(sandbox, work / "devices") as fleet,
        ):
            single = await run_single(sandbox, fleet, runs=plan.single_runs, log=log)
            burst = await run_fleet(sandbox, cloud, fleet, devices=plan.fleet_devices, log=log)
            bare = await run_bare(
                sandbox,
                work / "bare",
                count=plan.bare_devices,
                log=log,
                profile=plan.profile_devices > 0,
            )
    figures: dict[str, Any] = {}
    figures |= single.to_json()
    figures |= burst.to_json()
    figures |= bare.to_json()
    figures["single_latencies_seconds"] = [round(v, 3) for v in single.latencies]
    figures["cloud_cpu_vs_bare_calls"] = _ratio(
        burst.cloud_cpu_ms_per_device, bare.cpu_ms_per_device
    )
    if plan.profile_devices:
        with tempfile.TemporaryDirectory(prefix="ztp-bench-prof-", dir="/tmp") as tmp:
            figures["cloud_profile"] = await profile_cloud(
                Path(tmp), devices=plan.profile_devices, log=log
            )
    return figures


async def run_suite(*, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every benchmark, one after another, and return all figures in one object.

    Args:
        quick: the short plan (under a minute).
        log: progress lines.

    Returns:
        The figures; the headline ones are named in :data:`GOALS`.
    """
    plan = _Plan.of(quick=quick)
    started = time.monotonic()
    figures: dict[str, Any] = {"quick": quick}
    figures |= await _provisioning(plan, log)
    log("outbox: outbox + publisher vs raw aiomqtt, daemon RSS")
    outbox = await outbox_bench.run(**plan.outbox)
    figures["outbox"] = dataclasses.asdict(outbox)
    figures["outbox_vs_raw_aiomqtt"] = outbox.outbox_vs_raw_aiomqtt
    figures["rss_vs_import_floor"] = outbox.rss_vs_import_floor
    log(f"outbox: {outbox.outbox_vs_raw_aiomqtt} of raw aiomqtt, RSS {outbox.rss_vs_import_floor}x")
    log("kinesis: consumer vs bare GetRecords loop vs async-kinesis")
    kinesis = await kinesis_bench.run_benchmark(plan.kinesis, log=log)
    for key in ("kinesis_vs_bare_loop", "kinesis_vs_async_kinesis", "kinesis_cpu_vs_async_kinesis"):
        figures[key] = kinesis.get(key)
    figures["kinesis"] = kinesis
    figures["goals_missed"] = [name for name, ok in _verdicts(figures).items() if ok is False]
    figures["elapsed_seconds"] = round(time.monotonic() - started, 1)
    return figures


def _verdicts(figures: Mapping[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for name, goal, sense in GOALS:
        value = figures.get(name)
        if not isinstance(value, int | float):
            out[name] = None
        else:
            out[name] = value <= goal if sense == "<=" else value >= goal
    if figures.get("fleet_failures"):
        out["fleet_quota_ratio"] = False
    return out


def _machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


_LABELS: Final = {
    "fleet_quota_ratio": "fleet burst: wall ÷ (N / 15 s)",
    "single_p50_seconds": "one gateway, start → certificate stored, p50 (s)",
    "single_p99_seconds": "one gateway, start → certificate stored, p99 (s)",
    "kinesis_vs_bare_loop": "Kinesis consumer ÷ bare GetRecords loop (records/s)",
    "kinesis_vs_async_kinesis": "Kinesis consumer ÷ async-kinesis (records/s)",
    "kinesis_cpu_vs_async_kinesis": "Kinesis consumer ÷ async-kinesis (CPU per record)",
    "outbox_vs_raw_aiomqtt": "outbox + publisher ÷ raw aiomqtt (messages/s)",
    "rss_vs_import_floor": "daemon RSS ÷ import floor",
    "cloud_cpu_vs_bare_calls": "cloud daemon CPU per gateway ÷ bare IoT calls",
}


def render_markdown(figures: Mapping[str, Any], *, command: str, machine: Mapping[str, Any]) -> str:
    """The figures as the body of BENCHMARKS.md.

    Args:
        figures: what :func:`run_suite` returned.
        command: the command line that produced them.
        machine: CPU, cores, kernel, Python, load average.

    Returns:
        Markdown text.
    """
    verdicts = _verdicts(figures)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Command: `{command}` — {when}, {figures.get('elapsed_seconds')} s"
        + (" (quick plan)" if figures.get("quick") else ""),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']}, "
        f"Python {machine['python']}, load average before the run {machine['load_average']}.",
        "",
        "| figure | measured | goal | |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, goal, sense in GOALS:
        value = figures.get(name)
        shown = "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        verdict = {True: "met", False: "**missed**", None: "not measured"}[verdicts[name]]
        lines.append(f"| {_LABELS[name]} | {shown} | {sense} {goal:g} | {verdict} |")
    lines += [
        "",
        "Details:",
        "",
        f"- fleet: {figures.get('fleet_provisioned')}/{figures.get('fleet_devices')} gateways "
        f"provisioned, {figures.get('fleet_failures')} failures, wall "
        f"{figures.get('fleet_wall_seconds')} s vs {figures.get('fleet_quota_seconds')} s of "
        f"quota; latency p50 {figures.get('fleet_latency_p50_seconds')} s, max "
        f"{figures.get('fleet_latency_max_seconds')} s; {figures.get('fleet_iot_throttled')} "
        f"IoT calls throttled; device side {figures.get('fleet_device_cpu_ms_per_device')} ms "
        f"CPU per gateway.",
        f"- single: {figures.get('single_runs')} runs, min {figures.get('single_min_seconds')} s,"
        f" max {figures.get('single_max_seconds')} s, {figures.get('single_failures')} failures.",
        f"- cloud CPU: {figures.get('cloud_cpu_ms_per_device')} ms per gateway over the fleet "
        f"burst vs {figures.get('bare_calls_cpu_ms_per_device')} ms for the four calls in a "
        f"plain loop ({figures.get('bare_calls_devices')} gateways, "
        f"{figures.get('bare_calls_wall_ms_per_device')} ms wall each).",
    ]
    outbox = figures.get("outbox") or {}
    lines.append(
        f"- outbox: {outbox.get('outbox_msgs_per_s')} vs {outbox.get('raw_aiomqtt_msgs_per_s')}"
        f" messages/s raw; RSS {outbox.get('rss_mib')} MiB vs "
        f"{outbox.get('import_floor_rss_mib')} MiB import floor."
    )
    lines += _profile_table(figures)
    lines.append(
        f"- cloud timeline over the burst: first certificate minted after "
        f"{figures.get('fleet_cloud_first_minted_s')} s, minting span "
        f"{figures.get('fleet_cloud_minting_span_s')} s, tail "
        f"{figures.get('fleet_cloud_tail_s')} s; period per gateway mean "
        f"{figures.get('fleet_cloud_mean_period_ms')} ms, median "
        f"{figures.get('fleet_cloud_period_ms')} ms (quota 66.7 ms), of which the AirVantage "
        f"delivery {figures.get('fleet_cloud_delivery_ms')} ms; "
        f"{figures.get('fleet_cloud_slow_periods')} periods over 1.5 slots lost "
        f"{figures.get('fleet_cloud_slow_periods_lost_s')} s beyond the quota's pace; "
        f"{figures.get('fleet_cloud_stalls')} stalls over 0.5 s adding up to "
        f"{figures.get('fleet_cloud_stall_s')} s."
    )
    kinesis = figures.get("kinesis") or {}
    lines.append(
        f"- kinesis (1 shard): ours {kinesis.get('kinesis_records_per_s')}, bare loop "
        f"{kinesis.get('bare_loop_records_per_s')}, async-kinesis "
        f"{kinesis.get('async_kinesis_records_per_s')} records/s; CPU per record "
        f"{kinesis.get('kinesis_cpu_us_per_record')} / {kinesis.get('bare_loop_cpu_us_per_record')}"
        f" / {kinesis.get('async_kinesis_cpu_us_per_record')} µs; keeps up at 1,000 records/s: "
        f"{kinesis.get('keeps_up_1000_per_s')}."
    )
    return "\n".join(lines) + "\n"


_INTRO: Final = """\
# Benchmarks

`python -m bench [--quick] [--json] [--write BENCHMARKS.md]` (`make bench` runs it in full).
Every figure is a ratio or a latency measured side by side in one run on this machine, all on
loopback against the sandbox (mosquitto, moto, the AirVantage emulator); what each one compares
is in the docstrings of `bench/fleet.py`, `bench/single.py`, `bench/cloud_cpu.py`,
`bench/outbox.py` and `bench/kinesis.py`. The part above the analysis is written by the run.

"""

#: Where the hand-written analysis starts; a new run keeps it and rewrites what is above.
ANALYSIS_HEADING: Final = "## Analysis"


def _write_report(path: Path, markdown: str) -> None:
    try:
        existing = path.read_text()
    except FileNotFoundError:
        existing = ""
    kept = existing[existing.index(ANALYSIS_HEADING) :] if ANALYSIS_HEADING in existing else ""
    text = _INTRO + "## Figures\n\n" + markdown + ("\n" + kept if kept else "")
    path.write_text(text)


def _profile_table(figures: Mapping[str, Any]) -> list[str]:
    cloud = figures.get("cloud_profile")
    bare = figures.get("bare_calls_profile")
    if not cloud or not bare:
        return []
    lines = [
        "",
        f"Profile of the cloud CPU figure: both sides under cProfile timed by CPU (the profiler "
        f"inflates every figure alike), ms per gateway by area; ztp-cloud over a "
        f"{cloud['devices']}-gateway burst (whole run, start-up included), the bare loop over "
        f"{bare['devices']} gateways. AWS API calls per gateway: ztp-cloud "
        f"{cloud['aws_calls_per_device']}, bare loop {bare['aws_calls_per_device']}.",
        "",
        "| area | ztp-cloud | bare loop |",
        "| --- | ---: | ---: |",
    ]
    areas = list(cloud["ms_per_device"])
    areas += [area for area in bare["ms_per_device"] if area not in areas]
    for area in areas:
        ours = cloud["ms_per_device"].get(area, 0.0)
        theirs = bare["ms_per_device"].get(area, 0.0)
        lines.append(f"| {area} | {ours:g} | {theirs:g} |")
    total_ours = round(sum(cloud["ms_per_device"].values()), 2)
    total_theirs = round(sum(bare["ms_per_device"].values()), 2)
    lines += [f"| total | {total_ours:g} | {total_theirs:g} |", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench [--quick] [--json] [--write FILE]``.

    Returns:
        0 when every benchmark ran (goals met or not), 1 when one failed to run.
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the short plan (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--write", type=Path, default=None, metavar="FILE", help="also write Markdown here"
    )
    options = parser.parse_args(argv)
    quiet_logs()
    machine = _machine()
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    figures = asyncio.run(run_suite(quick=options.quick, log=log))
    figures["machine"] = machine
    command = "python -m bench" + (" --quick" if options.quick else "")
    markdown = render_markdown(figures, command=command, machine=machine)
    if options.write is not None:
        _write_report(options.write, markdown)
    if options.json:
        print(json.dumps(figures))
    else:
        print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
