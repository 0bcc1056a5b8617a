"""Benchmark: publishing through the durable outbox vs raw aiomqtt, and the daemon's memory.

Run ``python -m bench.outbox [--json] [--quick]``. One sandbox IoT broker (mosquitto, mutual TLS,
``set_tcp_nodelay true``) serves every run, in one process run:

- **raw aiomqtt**: one client, 100 senders awaiting ``client.publish(..., qos=1)`` (the PUBACK) in
  a loop, ``max_inflight_messages=100``; MQTT 5, as the publisher speaks. ``timeout=math.inf``
  spares aiomqtt a ``wait_for`` task per publish, which makes this baseline faster, not slower.
  It publishes the same messages as the outbox run: the same topic and payload, and the same
  message id (``<16 hex digits>-<n>``) as the same MQTT 5 user property (``ztp-id``), packed by
  the same :func:`~ztp_daemon.publisher.message_id_properties` (paho's own ``Properties`` would
  cost the baseline far more). The id is part of the publisher's contract (consumers drop QoS 1
  duplicates by it), so a baseline without it would not send the same messages; that run is
  measured too, as **raw aiomqtt without ids**, and reported beside it.
- **outbox**: the same broker and certificate, through :class:`~ztp_daemon.outbox.Outbox` (SQLite,
  WAL, ``synchronous=FULL``: every message committed before it is accepted) and
  :class:`~ztp_daemon.publisher.Publisher` (100 in flight, the message id as a user property,
  rows deleted on PUBACK), pacing off. Timed from the first ``submit`` to an empty outbox.

The three alternate (raw, raw without ids, outbox), ``repetitions`` times each, and the medians
are compared (the machine is shared: alternating keeps drift from favouring one side); the median
of the runs' pairs (outbox ÷ the raw run just before it) is reported beside the goal figure, as it
drifts less when other processes come and go. CPU time of the process per message is reported
beside the rates, and their ratio (raw ÷ outbox, the median of the runs' pairs): it moves far less
than the rates when other processes compete for the cores. The load average at the start is
reported with them.

Memory: the daemon's publishing half (outbox, publisher, ingestion socket, heartbeat) runs in a
child process, publishes 1,000 messages, settles, and reports its RSS; the floor is a bare
``python`` that only imports aiomqtt, cryptography (x509), structlog and sqlite3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiomqtt
import structlog

from sandbox.brokers import (
    ClientCertificate,
    IotBroker,
    client_tls_context,
    write_client_certificate,
)
from sandbox.pki import SandboxPki
from ztp_daemon.heartbeat import Heartbeat
from ztp_daemon.ingest import IngestConfig, IngestServer
from ztp_daemon.outbox import Outbox
from ztp_daemon.publisher import (
    FileCredentials,
    Publisher,
    PublisherConfig,
    message_id_properties,
)

__all__ = ["Result", "main", "run"]

IN_FLIGHT = 100
PAYLOAD = b'{"temperature":21.5,"humidity":40,"battery":3.61,"seq":0000000000}'.ljust(100, b" ")
FLOOR_IMPORTS = "import aiomqtt, cryptography.x509, sqlite3, structlog"
RAW_UID = "0123456789abcdef"


@dataclass(frozen=True, slots=True)
class Result:
    """The figures, as printed with ``--json``."""

    messages_per_run: int
    repetitions: int
    outbox_msgs_per_s: float
    raw_aiomqtt_msgs_per_s: float
    outbox_vs_raw_aiomqtt: float
    raw_no_ids_msgs_per_s: float
    outbox_vs_raw_no_ids: float
    outbox_vs_raw_pairs: float
    outbox_runs: list[float]
    raw_runs: list[float]
    raw_no_ids_runs: list[float]
    outbox_commits_per_run: float
    raw_cpu_us_per_msg: float
    raw_no_ids_cpu_us_per_msg: float
    outbox_cpu_us_per_msg: float
    cpu_raw_vs_outbox: float
    cpu_raw_no_ids_vs_outbox: float
    load_average: list[float]
    rss_mib: float
    import_floor_rss_mib: float
    rss_vs_import_floor: float


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _raw_run(
    broker: IotBroker, cert: ClientCertificate, count: int, *, ids: bool = True
) -> float:
    context = client_tls_context(broker.address, cert)
    properties_of = message_id_properties("ztp-id") if ids else None
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier=cert.common_name,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        max_inflight_messages=IN_FLIGHT,
    ) as client:
        client.pending_calls_threshold = IN_FLIGHT + 1
        topic = f"dt/{cert.common_name}/bench"
        work = iter(range(count))

        async def sender() -> None:
            if properties_of is None:
                for _ in work:
                    await client.publish(topic, PAYLOAD, qos=1, timeout=math.inf)
                return
            for index in work:
                # The outbox's ids: its 16-hex-digit uid, then the message's sequence number.
                properties = properties_of(f"{RAW_UID}-{index + 1}")
                await client.publish(topic, PAYLOAD, qos=1, properties=properties, timeout=math.inf)

        began = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(IN_FLIGHT):
                group.create_task(sender())
        return count / (time.perf_counter() - began)


async def _outbox_run(
    broker: IotBroker, pki: SandboxPki, cert: ClientCertificate, count: int, db: Path
) -> tuple[float, int]:
    config = PublisherConfig(
        thing_name=cert.common_name,
        host="127.0.0.1",
        port=broker.port,
        ca_file=pki.ca_file,
        publish_rate=None,
    )
    credentials = FileCredentials(cert.cert_file, cert.key_file, "127.0.0.1")
    async with (
        Outbox(db) as outbox,
        Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
    ):
        await asyncio.wait_for(publisher.wait_connected(), 10)
        topic = f"dt/{cert.common_name}/bench"
        began = time.perf_counter()
        accepted: list[asyncio.Future[list[str]]] = []
        batch = [PAYLOAD] * IN_FLIGHT
        for _ in range(0, count, IN_FLIGHT):
            # A producer handing over batches of 100 and awaiting their commit.
            accepted.append(outbox.submit_many(topic, batch))
            await asyncio.sleep(0)
        await asyncio.gather(*accepted)
        while outbox.stats().depth:  # noqa: ASYNC110 - the figure is "until empty"
            await asyncio.sleep(0.002)
        rate = count / (time.perf_counter() - began)
        return rate, outbox.transactions


async def _child_daemon(args: list[str]) -> None:
    """The daemon's publishing half: publish 1,000 messages, settle, print the RSS as JSON."""
    port, ca, cert, key, thing, work = (
        int(args[0]),
        Path(args[1]),
        Path(args[2]),
        Path(args[3]),
        args[4],
        Path(args[5]),
    )
    config = PublisherConfig(
        thing_name=thing, host="127.0.0.1", port=port, ca_file=ca, publish_rate=None
    )
    credentials = FileCredentials(cert, key, "127.0.0.1")
    async with (
        Outbox(work / "daemon.db") as outbox,
        Publisher(config=config, outbox=outbox, credentials=credentials) as publisher,
        IngestServer(config=IngestConfig.for_thing(work / "ingest.sock", thing), outbox=outbox),
        Heartbeat(
            outbox=outbox,
            topic=f"dt/{thing}/health",
            interval=3600,
            credentials=credentials,
            publisher=publisher,
        ),
    ):
        await asyncio.wait_for(publisher.wait_connected(), 10)
        await asyncio.gather(*(outbox.submit(f"dt/{thing}/bench", PAYLOAD) for _ in range(1000)))
        while outbox.stats().depth:  # noqa: ASYNC110 - waiting for the outbox to empty
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # steady state: nothing queued, connection idle
        print(json.dumps({"rss_mib": _rss_mib()}), flush=True)


def _measure_daemon_rss(broker: IotBroker, pki: SandboxPki, cert: ClientCertificate) -> float:
    with tempfile.TemporaryDirectory(prefix="ztp-rss-", dir="/tmp") as work:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.outbox",
                "--child-daemon",
                str(broker.port),
                str(pki.ca_file),
                str(cert.cert_file),
                str(cert.key_file),
                cert.common_name,
                work,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    rss: float = json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]
    return rss


def _measure_floor_rss() -> float:
    code = f"{FLOOR_IMPORTS}\nfrom bench.outbox import _rss_mib\nprint(_rss_mib())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return float(out.stdout.strip())


async def run(*, count: int, repetitions: int, memory_runs: int) -> Result:
    """Start a sandbox IoT broker, run both throughput benchmarks alternately, then memory.

    Args:
        count: messages per throughput run.
        repetitions: runs of each kind (medians are reported).
        memory_runs: daemon child processes to measure (median RSS).

    Returns:
        Every figure.
    """
    load = [round(value, 2) for value in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="ztp-bench-", dir="/tmp") as tmp:
        directory = Path(tmp)
        pki = SandboxPki.load_or_create(directory / "pki")
        async with IotBroker(directory / "broker", pki=pki) as broker:
            cert = write_client_certificate(pki, "bench-thing", directory / "things")
            raw_runs: list[float] = []
            bare_runs: list[float] = []
            outbox_runs: list[float] = []
            commits: list[int] = []
            # CPU time of this process (loop and SQLite threads) per message: unlike the rates,
            # it hardly moves when other processes compete for the two cores.
            raw_cpu: list[float] = []
            bare_cpu: list[float] = []
            outbox_cpu: list[float] = []
            # One warm-up of each, not counted: first TLS handshakes, SQLite page cache.
            await _raw_run(broker, cert, min(count, 2000))
            await _raw_run(broker, cert, min(count, 2000), ids=False)
            await _outbox_run(broker, pki, cert, min(count, 2000), directory / "warm.db")
            for index in range(repetitions):
                began = time.process_time()
                raw_runs.append(await _raw_run(broker, cert, count))
                raw_cpu.append((time.process_time() - began) / count * 1e6)
                began = time.process_time()
                bare_runs.append(await _raw_run(broker, cert, count, ids=False))
                bare_cpu.append((time.process_time() - began) / count * 1e6)
                began = time.process_time()
                rate, transactions = await _outbox_run(
                    broker, pki, cert, count, directory / f"run{index}.db"
                )
                outbox_cpu.append((time.process_time() - began) / count * 1e6)
                outbox_runs.append(rate)
                commits.append(transactions)
            rss_runs = [
                await asyncio.to_thread(_measure_daemon_rss, broker, pki, cert)
                for _ in range(memory_runs)
            ]
            rss = statistics.median(rss_runs)
    floor = statistics.median(_measure_floor_rss() for _ in range(memory_runs))
    outbox_rate = statistics.median(outbox_runs)
    raw_rate = statistics.median(raw_runs)
    bare_rate = statistics.median(bare_runs)
    return Result(
        messages_per_run=count,
        repetitions=repetitions,
        outbox_msgs_per_s=round(outbox_rate, 1),
        raw_aiomqtt_msgs_per_s=round(raw_rate, 1),
        outbox_vs_raw_aiomqtt=round(outbox_rate / raw_rate, 3),
        raw_no_ids_msgs_per_s=round(bare_rate, 1),
        outbox_vs_raw_no_ids=round(outbox_rate / bare_rate, 3),
        outbox_vs_raw_pairs=_median_ratio(outbox_runs, raw_runs),
        outbox_runs=[round(r) for r in outbox_runs],
        raw_runs=[round(r) for r in raw_runs],
        raw_no_ids_runs=[round(r) for r in bare_runs],
        outbox_commits_per_run=statistics.median(commits),
        raw_cpu_us_per_msg=round(statistics.median(raw_cpu), 1),
        raw_no_ids_cpu_us_per_msg=round(statistics.median(bare_cpu), 1),
        outbox_cpu_us_per_msg=round(statistics.median(outbox_cpu), 1),
        cpu_raw_vs_outbox=_median_ratio(raw_cpu, outbox_cpu),
        cpu_raw_no_ids_vs_outbox=_median_ratio(bare_cpu, outbox_cpu),
        load_average=load,
        rss_mib=round(rss, 1),
        import_floor_rss_mib=round(floor, 1),
        rss_vs_import_floor=round(rss / floor, 3),
    )


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the runs' ratios, each pair measured one right after the other.

    The machine is shared: a pair sees nearly the same load, so the median of the pairs' ratios
    drifts less than the ratio of the medians when other processes come and go.
    """
    return round(statistics.median(n / d for n, d in zip(numerators, denominators, strict=True)), 3)


def _cpu_pair(raw: float, outbox: float) -> str:
    return f"{raw:.1f} / {outbox:.1f} us"


def _table(result: Result) -> str:
    rows = [
        (
            "raw aiomqtt, QoS 1, 100 in flight, mTLS, ids",
            f"{result.raw_aiomqtt_msgs_per_s:,.0f} msg/s",
        ),
        ("raw aiomqtt without ids", f"{result.raw_no_ids_msgs_per_s:,.0f} msg/s"),
        ("outbox + publisher (SQLite FULL, ids)", f"{result.outbox_msgs_per_s:,.0f} msg/s"),
        ("outbox / raw (goal >= 0.8)", f"{result.outbox_vs_raw_aiomqtt:.3f}"),
        ("outbox / raw without ids", f"{result.outbox_vs_raw_no_ids:.3f}"),
        ("outbox / raw, median of the runs' pairs", f"{result.outbox_vs_raw_pairs:.3f}"),
        ("commits per run (group commit)", f"{result.outbox_commits_per_run:,.0f}"),
        (
            "CPU per message, raw / outbox",
            _cpu_pair(result.raw_cpu_us_per_msg, result.outbox_cpu_us_per_msg),
        ),
        ("CPU per message, raw / outbox (ratio)", f"{result.cpu_raw_vs_outbox:.3f}"),
        (
            "CPU per message, raw without ids / outbox",
            _cpu_pair(result.raw_no_ids_cpu_us_per_msg, result.outbox_cpu_us_per_msg),
        ),
        ("CPU, raw without ids / outbox (ratio)", f"{result.cpu_raw_no_ids_vs_outbox:.3f}"),
        ("daemon RSS, steady state", f"{result.rss_mib:.1f} MiB"),
        (
            "python + aiomqtt/cryptography/structlog/sqlite3",
            f"{result.import_floor_rss_mib:.1f} MiB",
        ),
        ("RSS / floor (goal <= 1.25)", f"{result.rss_vs_import_floor:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{result.messages_per_run:,} messages x {result.repetitions} runs each, medians",
        *(f"{name:<{width}}  {value:>16}" for name, value in rows),
        f"raw runs:    {result.raw_runs}",
        f"raw without ids runs: {result.raw_no_ids_runs}",
        f"outbox runs: {result.outbox_runs}",
        f"load average at start: {result.load_average}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, or one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--child-daemon", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Only warnings, and on stderr: stdout carries the result.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if args.child_daemon:
        asyncio.run(_child_daemon(args.child_daemon))
        return 0
    if args.quick:
        result = asyncio.run(run(count=5000, repetitions=3, memory_runs=1))
    else:
        result = asyncio.run(run(count=20000, repetitions=5, memory_runs=3))
    print(json.dumps(asdict(result)) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
