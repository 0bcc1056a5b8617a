"""Cloud daemon CPU per provisioned gateway vs a plain aiobotocore loop making the same IoT calls.

Run as part of ``python -m bench`` (the daemon's side is measured by :mod:`bench.fleet`, over
its burst), ``python -m bench.cloud_cpu [--quick] [--json]`` for the baseline alone, or
``python -m bench.cloud_cpu --fleet N [--repeat R]`` for the figure itself: a burst of N gateways
through a real ``ztp-cloud`` and the baseline over N gateways, in one sandbox, one after the
other; with ``--repeat``, R such runs (a fresh sandbox each) and the median of their ratios, with
the load average at the start of each (the ratio moves with the load of a shared machine).

The baseline: a child process (``python -m bench.cloud_cpu bare ...``) with one aiobotocore IoT
client against the same sandbox, doing for each of ``count`` CSRs, one after another, the four
calls the daemon makes per gateway: CreateCertificateFromCsr (setAsActive), CreateThing,
AttachThingPrincipal, AttachPolicy. It times its own CPU (``resource.getrusage``, all threads)
around the loop only; client creation and one warm-up call are outside. IoT throttling is off
for the baseline (it never waits), so nothing but the calls is counted.

The figure ``cloud_cpu_vs_bare_calls`` = the daemon's CPU per provisioned gateway over the
fleet burst (everything: Kinesis polling, CSR checks, the idempotency ledger, the AirVantage
delivery and its follow-up, logging, metrics) ÷ the baseline's CPU per gateway. Goal ≤ 1.5.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.common import median
from bench.fleet import CloudDaemon, DeviceFleet, bench_sandbox, quiet_logs, run_fleet
from sandbox.world import Sandbox

__all__ = ["BareResult", "main", "profile_cloud", "profile_summary", "run_bare", "write_csrs"]

GOAL = 1.5
_POLICY = "ztp-bench-bare"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_csrs(path: Path, count: int, *, prefix: str) -> list[str]:
    """Make ``count`` EC P-256 CSRs (CN ``{prefix}{i}``), write them as a JSON list; return them."""
    csrs = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{prefix}{index}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        csrs.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    path.write_text(json.dumps(csrs))
    return csrs


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _bare_child(
    endpoint: str, region: str, csrs: Sequence[str], prefix: str, profile: Path | None
) -> int:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError

    # moto's fixed test credentials, as MotoSandbox.client_kwargs() gives them.
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    async with get_session().create_client(
        "iot",
        endpoint_url=endpoint,
        region_name=region,
        config=AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
        **credentials,
    ) as iot:
        try:
            await iot.create_policy(
                policyName=_POLICY,
                policyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}],
                    }
                ),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException":
                raise
        await iot.describe_endpoint(endpointType="iot:Data-ATS")  # warm-up, not counted
        profiler = None if profile is None else cProfile.Profile(time.process_time)
        if profiler is not None:
            profiler.enable()
        began_cpu, began = _cpu(), time.monotonic()
        for index, csr in enumerate(csrs):
            thing = f"{prefix}{index}"
            created = await iot.create_certificate_from_csr(
                certificateSigningRequest=csr, setAsActive=True
            )
            arn = created["certificateArn"]
            await iot.create_thing(thingName=thing)
            await iot.attach_thing_principal(thingName=thing, principal=arn)
            await iot.attach_policy(policyName=_POLICY, target=arn)
        cpu, wall = _cpu() - began_cpu, time.monotonic() - began
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
    sys.stdout.write(json.dumps({"cpu_seconds": cpu, "wall_seconds": wall}) + "\n")
    return 0


@dataclass(frozen=True, slots=True)
class BareResult:
    """The baseline's figures."""

    count: int
    cpu_ms_per_device: float
    wall_ms_per_device: float
    runs_cpu_ms_per_device: tuple[float, ...] = ()
    profile: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""
        figures: dict[str, Any] = {
            "bare_calls_devices": self.count,
            "bare_calls_cpu_ms_per_device": round(self.cpu_ms_per_device, 2),
            "bare_calls_wall_ms_per_device": round(self.wall_ms_per_device, 2),
            "bare_calls_runs_cpu_ms_per_device": list(self.runs_cpu_ms_per_device),
        }
        if self.profile is not None:
            figures["bare_calls_profile"] = self.profile
        return figures


async def run_bare(
    sandbox: Sandbox,
    work: Path,
    *,
    count: int,
    log: Callable[[str], None],
    repetitions: int = 3,
    profile: bool = False,
) -> BareResult:
    """Run the baseline loop in child processes against the sandbox's moto (throttling off).

    Args:
        sandbox: the running sandbox.
        work: where the CSR files go.
        count: gateways' worth of calls per run.
        log: progress lines.
        repetitions: runs, each in a fresh child (the median is reported).
        profile: one more run under cProfile (timed by CPU), summarised by area.

    Returns:
        The baseline's CPU and wall time per gateway.

    Raises:
        RuntimeError: a child failed.
    """
    runs = [await _bare_once(sandbox, work, count=count) for _ in range(repetitions)]
    cpu = median([r[0] for r in runs])
    wall = median([r[1] for r in runs])
    summary: dict[str, Any] | None = None
    if profile:
        stats = work / "bare.prof"
        await _bare_once(sandbox, work, count=count, profile=stats)
        summary = await asyncio.to_thread(profile_summary, stats)
        _per_device(summary, count)
    result = BareResult(
        count=count,
        cpu_ms_per_device=cpu / count * 1000,
        wall_ms_per_device=wall / count * 1000,
        runs_cpu_ms_per_device=tuple(round(r[0] / count * 1000, 2) for r in runs),
        profile=summary,
    )
    log(
        f"bare aiobotocore loop: {result.cpu_ms_per_device:.2f} ms CPU, "
        f"{result.wall_ms_per_device:.1f} ms wall per gateway ({count} gateways, "
        f"runs {list(result.runs_cpu_ms_per_device)} ms)"
    )
    return result


async def _bare_once(
    sandbox: Sandbox, work: Path, *, count: int, profile: Path | None = None
) -> tuple[float, float]:
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    prefix = f"bare-{secrets.token_hex(4)}-"
    csrs_file = work / f"{prefix}csrs.json"
    await asyncio.to_thread(write_csrs, csrs_file, count, prefix=prefix)
    before = await sandbox.aws.config()
    await sandbox.aws.configure(iot_throttling=False)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.cloud_cpu",
            "bare",
            "--endpoint",
            sandbox.aws.endpoint_url,
            "--region",
            sandbox.aws.region,
            "--csrs",
            str(csrs_file),
            "--prefix",
            prefix,
            *([] if profile is None else ["--profile", str(profile)]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=_PROJECT_ROOT,
        )
        stdout, stderr = await process.communicate()
    finally:
        await sandbox.aws.configure(iot_throttling=before.iot_throttling)
    if process.returncode != 0:
        msg = f"the bare-calls child failed ({process.returncode}): {stderr.decode()[-2000:]}"
        raise RuntimeError(msg)
    figures = json.loads(stdout)
    return float(figures["cpu_seconds"]), float(figures["wall_seconds"])


#: Where a function's own time is booked, by the first matching fragment of its file or name.
_AREAS = (
    ("botocore", "AWS SDK (botocore, aiobotocore)"),
    ("aiohttp", "aiohttp (HTTP: AWS and AirVantage)"),
    ("multidict", "aiohttp (HTTP: AWS and AirVantage)"),
    ("yarl", "aiohttp (HTTP: AWS and AirVantage)"),
    ("sqlite3", "SQLite (ledger, leases)"),
    ("cryptography", "cryptography (CSR checks)"),
    ("structlog", "logging (structlog)"),
    ("/logging/", "logging (structlog)"),
    ("prometheus_client", "metrics"),
    ("json", "JSON"),
    ("ssl", "TLS"),
    ("select.epoll", "event loop (epoll, sockets)"),
    ("selectors", "event loop (epoll, sockets)"),
    ("socket", "event loop (epoll, sockets)"),
    ("asyncio", "event loop (epoll, sockets)"),
    ("cloud_daemon/", "cloud_daemon (ours)"),
    ("shared/", "shared (ours)"),
    ("importlib", "imports and start-up"),
    ("<frozen", "imports and start-up"),
)


def _area(filename: str, function: str) -> str:
    where = f"{filename} {function}"
    for fragment, area in _AREAS:
        if fragment in where:
            return area
    return "other"


def profile_summary(path: Path, *, top: int = 10) -> dict[str, Any]:
    """Book a cProfile run's own time (tottime) by area, and list the costliest functions.

    Builtins are booked to their callers' areas.

    Args:
        path: the statistics file (``python -m cProfile -o``).
        top: how many functions to list.

    Returns:
        ``{"total_seconds", "areas": {area: seconds}, "functions": [[name, seconds], ...]}``.
    """
    stats = pstats.Stats(str(path))
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]  # pstats keeps its table untyped
    areas: dict[str, float] = {}
    functions: list[tuple[float, str]] = []
    for (filename, line, function), (_, _, own, _, callers) in table.items():
        if filename == "~" and callers:
            # A builtin (str.join, isinstance...) is booked to the areas of its callers, by the
            # time it took for each of them: 'str.join' alone says nothing of who paid it.
            for (caller_file, _, caller_function), timing in callers.items():
                area = _area(caller_file, caller_function)
                areas[area] = areas.get(area, 0.0) + timing[2]
        else:
            area = _area(filename, function)
            areas[area] = areas.get(area, 0.0) + own
        short = "/".join(Path(filename).parts[-2:])
        functions.append((own, f"{short}:{line} {function}"))
    total = sum(areas.values())
    functions.sort(reverse=True)
    # Every AWS request is serialized once, whatever the protocol: a count of API calls.
    aws_calls = sum(
        timing[1]
        for (filename, _, function), timing in table.items()
        if function == "serialize_to_request" and filename.endswith("botocore/serialize.py")
    )
    return {
        "total_seconds": round(total, 2),
        "aws_calls": aws_calls,
        "areas": {
            area: round(seconds, 2)
            for area, seconds in sorted(areas.items(), key=lambda item: -item[1])
        },
        "functions": [[name, round(seconds, 3)] for seconds, name in functions[:top]],
    }


def _per_device(summary: dict[str, Any], devices: int) -> None:
    summary["devices"] = devices
    summary["aws_calls_per_device"] = round(summary["aws_calls"] / devices, 2)
    summary["ms_per_device"] = {
        area: round(seconds / devices * 1000, 2) for area, seconds in summary["areas"].items()
    }


async def profile_cloud(work: Path, *, devices: int, log: Callable[[str], None]) -> dict[str, Any]:
    """A fleet burst with ``ztp-cloud`` under cProfile (a run of its own: the profiler inflates
    CPU), summarised by area.

    Args:
        work: a scratch directory.
        devices: gateways in the burst.
        log: progress lines.

    Returns:
        What :func:`profile_summary` returns, plus ``devices`` and ``ms_per_device`` by area.
    """
    stats = work / "cloud.prof"
    async with (
        bench_sandbox(work / "sandbox") as sandbox,
        CloudDaemon(sandbox, work / "cloud", profile=stats) as cloud,
        DeviceFleet(sandbox, work / "devices") as fleet,
    ):
        await run_fleet(sandbox, cloud, fleet, devices=devices, log=log)
    summary = await asyncio.to_thread(profile_summary, stats)
    _per_device(summary, devices)
    log(f"cloud profile ({devices} gateways, whole run incl. start-up): {summary['areas']}")
    return summary


async def _with_fleet(devices: int, *, log: Callable[[str], None]) -> dict[str, Any]:
    """The figure from one run: a fleet burst of ``devices``, then the baseline over as many."""
    with tempfile.TemporaryDirectory(prefix="ztp-bench-cpu-", dir="/tmp") as tmp:
        work = Path(tmp)
        async with bench_sandbox(work / "sandbox") as sandbox:
            async with (
                CloudDaemon(sandbox, work / "cloud") as cloud,
                DeviceFleet(sandbox, work / "devices") as fleet,
            ):
                burst = await run_fleet(sandbox, cloud, fleet, devices=devices, log=log)
            bare = await run_bare(sandbox, work / "bare", count=devices, log=log)
    ratio = burst.cloud_cpu_ms_per_device / bare.cpu_ms_per_device
    log(f"cloud CPU per gateway / bare calls: {ratio:.3f} (goal <= {GOAL})")
    return burst.to_json() | bare.to_json() | {"cloud_cpu_vs_bare_calls": round(ratio, 3)}


def _load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def _repeated(devices: int, repeat: int, *, log: Callable[[str], None]) -> dict[str, Any]:
    """``repeat`` runs of :func:`_with_fleet`; the last run's figures, the medians, each run."""
    runs = []
    for index in range(repeat):
        load = await asyncio.to_thread(_load_average)
        log(f"run {index + 1} of {repeat}, load average {load:.2f}")
        runs.append((load, await _with_fleet(devices, log=log)))
    figures = dict(runs[-1][1])  # a copy: the medians must not overwrite the last run's figures
    figures["cloud_cpu_vs_bare_calls"] = round(
        median([run["cloud_cpu_vs_bare_calls"] for _, run in runs]), 3
    )
    figures["cloud_cpu_ms_per_device"] = round(
        median([run["cloud_cpu_ms_per_device"] for _, run in runs]), 2
    )
    figures["bare_calls_cpu_ms_per_device"] = round(
        median([run["bare_calls_cpu_ms_per_device"] for _, run in runs]), 2
    )
    figures["runs"] = [
        {
            "load_average": load,
            "cloud_cpu_ms_per_device": run["cloud_cpu_ms_per_device"],
            "bare_calls_cpu_ms_per_device": run["bare_calls_cpu_ms_per_device"],
            "cloud_cpu_vs_bare_calls": run["cloud_cpu_vs_bare_calls"],
        }
        for load, run in runs
    ]
    log(
        f"median cloud CPU per gateway / bare calls over {repeat} runs: "
        f"{figures['cloud_cpu_vs_bare_calls']} (goal <= {GOAL})"
    )
    return figures


async def _standalone(*, quick: bool, log: Callable[[str], None]) -> BareResult:
    with tempfile.TemporaryDirectory(prefix="ztp-bench-cpu-", dir="/tmp") as tmp:
        work = Path(tmp)
        async with bench_sandbox(work / "sandbox") as sandbox:
            return await run_bare(sandbox, work, count=60 if quick else 300, log=log)


def _profiled_cloud(out: Path) -> int:
    """``ztp-cloud run`` under cProfile timed by this process's CPU time (all threads)."""
    from cloud_daemon.__main__ import main as cloud_main

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        return cloud_main(["run"])
    finally:
        profiler.disable()
        profiler.dump_stats(str(out))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.cloud_cpu [--quick] [--json]`` (and the child's ``bare`` mode).

    Returns:
        0.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["profiled-cloud"]:
        child = argparse.ArgumentParser(prog="python -m bench.cloud_cpu profiled-cloud")
        child.add_argument("--out", type=Path, required=True)
        options = child.parse_args(arguments[1:])
        return _profiled_cloud(options.out)
    if arguments[:1] == ["bare"]:
        child = argparse.ArgumentParser(prog="python -m bench.cloud_cpu bare")
        child.add_argument("--endpoint", required=True)
        child.add_argument("--region", required=True)
        child.add_argument("--csrs", type=Path, required=True)
        child.add_argument("--prefix", required=True)
        child.add_argument("--profile", type=Path, default=None)
        options = child.parse_args(arguments[1:])
        csrs: list[str] = json.loads(options.csrs.read_text())
        return asyncio.run(
            _bare_child(options.endpoint, options.region, csrs, options.prefix, options.profile)
        )
    parser = argparse.ArgumentParser(prog="python -m bench.cloud_cpu", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="60 gateways' calls, not 300")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile ztp-cloud over N gateways"
    )
    parser.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="the ratio itself: ztp-cloud over a burst of N gateways, then the baseline",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="R", help="with --fleet: R runs, the median"
    )
    options = parser.parse_args(arguments)
    quiet_logs()
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    if options.profile:
        with tempfile.TemporaryDirectory(prefix="ztp-bench-prof-", dir="/tmp") as tmp:
            profile = asyncio.run(profile_cloud(Path(tmp), devices=options.profile, log=log))
        print(json.dumps(profile, indent=None if options.json else 2))
        return 0
    if options.fleet:
        figures = asyncio.run(_repeated(options.fleet, max(1, options.repeat), log=log))
        print(json.dumps(figures, indent=None if options.json else 2))
        return 0
    result = asyncio.run(_standalone(quick=options.quick, log=log))
    print(json.dumps(result.to_json(), indent=None if options.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
