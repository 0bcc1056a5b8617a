"""The cloud daemon as a service: components wired, health and metrics served, orderly stop.

Theory of operation
-------------------

:func:`serve` builds, in one :class:`contextlib.AsyncExitStack`, in this order: the aiobotocore
clients (Kinesis, IoT, and DynamoDB when the stores live there), the lease store and the
issuance ledger, the :class:`~cloud_daemon.airvantage.AirVantageClient`, the HTTP server, a
:class:`asyncio.TaskGroup` running the delivery follow-up (task ``ztp-delivery-tracker``), and
last the :class:`~cloud_daemon.consumer.StreamConsumer` whose handler is the
:class:`~cloud_daemon.handler.ShardHandler`. Then it sets ``ready`` (if given), logs
``service.ready`` with the HTTP port, and awaits ``shutdown()``.

When ``shutdown()`` returns (SIGTERM, in ``__main__``), the stack unwinds in reverse, all of it
bounded by ``shutdown_timeout`` (at most 30 s): the consumer stops fetching, lets its readers
finish their batch and checkpoint, and releases every lease (another instance takes the shards at
once, without repeats); then the follow-up task is cancelled (it holds nothing durable: the
ledger keeps every certificate and its operation), the HTTP server stops, and the clients close.

HTTP endpoints:

- ``GET /healthz``: 200 while the service's tasks run (the follow-up task and the consumer), 503
  otherwise. Liveness: restart the container when it fails.
- ``GET /readyz``: 200 when the stream answers ``DescribeStreamSummary`` as ACTIVE or UPDATING and
  AirVantage accepts our token (an authenticated lookup that any answer but a refusal
  satisfies), each probe bounded by ``http.probe_timeout``; 503 with a JSON body naming the
  failed check otherwise.
- ``GET /metrics``: Prometheus text from a registry of the service's own: the handler's counters
  (:class:`~cloud_daemon.handler.CloudMetrics`) and, per shard, records handled, records per
  second, MillisBehindLatest, Kinesis throttles, errors and dead letters from
  :meth:`StreamConsumer.metrics`.

IoT throttles are counted by API as the calls pass (a thin wrapper around the IoT client); the
issuer still does the backing off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import botocore.exceptions
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cloud_daemon.airvantage import AirVantageClient
from cloud_daemon.config import CloudConfig, StoreKind
from cloud_daemon.consumer import ShardMetrics, StreamConsumer
from cloud_daemon.deadletter import JsonLinesDeadLetter
from cloud_daemon.errors import AwsServiceError, SystemNotFoundError
from cloud_daemon.handler import CloudMetrics, DeliveryLoop, DeliveryTracker, ShardHandler
from cloud_daemon.intake import Intake
from cloud_daemon.issuer import Issuer
from cloud_daemon.leases import (
    DynamoLeaseStore,
    LeaseStore,
    SqliteLeaseStore,
    aws_errors,
    create_lease_table,
)
from cloud_daemon.ledger import DynamoLedger, IssuanceLedger, SqliteLedger, create_ledger_table
from cloud_daemon.ratelimit import RateLimiter
from shared.errors import ZtpError

__all__ = ["PROBE_SERIAL", "serve"]

_log = structlog.get_logger()

PROBE_SERIAL: Final = "ZTP-READINESS-PROBE"
"""The serial the readiness probe looks up: any answer proves the token is accepted."""
_THROTTLE_CODES: Final = frozenset(
    {"ThrottlingException", "TooManyRequestsException", "LimitExceededException"}
)
_STREAM_READY: Final = frozenset({"ACTIVE", "UPDATING"})


def _aws_kwargs(config: CloudConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.aws.region is not None:
        kwargs["region_name"] = config.aws.region
    if config.aws.endpoint_url is not None:
        kwargs["endpoint_url"] = config.aws.endpoint_url
    if config.aws.max_attempts is not None:
        kwargs["config"] = AioConfig(
            retries={"total_max_attempts": config.aws.max_attempts, "mode": "standard"}
        )
    return kwargs


class _ThrottleCounter:
    """An IoT client that counts throttled calls by API on their way through."""

    def __init__(self, client: Any, metrics: CloudMetrics) -> None:
        self._client = client
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method
        api = "".join(part.title() for part in name.split("_"))

        async def call(**kwargs: Any) -> Any:
            try:
                return await method(**kwargs)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _THROTTLE_CODES:
                    self._metrics.throttles.labels(api=api).inc()
                raise

        return call


class _ShardCollector(Collector):
    """Per-shard figures of the consumer, read at every scrape."""

    def __init__(self, source: Callable[[], Mapping[str, ShardMetrics]]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        labels = ["shard"]
        records = CounterMetricFamily("ztp_cloud_records", "Records handled", labels=labels)
        rate = GaugeMetricFamily(
            "ztp_cloud_records_per_second", "Records handled per second (10 s)", labels=labels
        )
        lag = GaugeMetricFamily(
            "ztp_cloud_millis_behind_latest", "MillisBehindLatest of the last read", labels=labels
        )
        throttles = CounterMetricFamily(
            "ztp_cloud_kinesis_throttles", "Kinesis reads throttled", labels=labels
        )
        errors = CounterMetricFamily("ztp_cloud_shard_errors", "Shard errors", labels=labels)
        dead = CounterMetricFamily("ztp_cloud_dead_letters", "Records dead-lettered", labels=labels)
        owned = GaugeMetricFamily(
            "ztp_cloud_shard_owned", "1 if this worker reads it", labels=labels
        )
        for shard, figures in self._source().items():
            records.add_metric([shard], figures.records)
            rate.add_metric([shard], figures.records_per_second)
            if figures.millis_behind_latest is not None:
                lag.add_metric([shard], figures.millis_behind_latest)
            throttles.add_metric([shard], figures.throttles)
            errors.add_metric([shard], figures.errors)
            dead.add_metric([shard], figures.dead_lettered)
            owned.add_metric([shard], 1.0 if figures.owned else 0.0)
        return [records, rate, lag, throttles, errors, dead, owned]


@dataclass(slots=True)
class _State:
    """What the HTTP handlers look at."""

    config: CloudConfig
    kinesis: Any
    client: AirVantageClient
    metrics: CloudMetrics
    consumer: StreamConsumer | None = None
    tracker_task: asyncio.Task[None] | None = None
    stopping: bool = False

    def shard_metrics(self) -> Mapping[str, ShardMetrics]:
        return {} if self.consumer is None else self.consumer.metrics()


def _json(body: Mapping[str, Any], status: int) -> web.Response:
    return web.Response(
        text=json.dumps(body, sort_keys=True), status=status, content_type="application/json"
    )


async def _probe_stream(state: _State) -> str | None:
    name = state.config.kinesis.stream
    async with aws_errors("DescribeStreamSummary", resource=name):
        answer = await state.kinesis.describe_stream_summary(StreamName=name)
    status = answer["StreamDescriptionSummary"]["StreamStatus"]
    return None if status in _STREAM_READY else f"stream status {status}"


async def _probe_airvantage(state: _State) -> str | None:
    # Any answer to an authenticated request, "no such system" included, proves the token good.
    with contextlib.suppress(SystemNotFoundError):
        await state.client.system_uid(PROBE_SERIAL)
    return None


async def _check(probe: Awaitable[str | None], within: float) -> str:
    try:
        async with asyncio.timeout(within):
            problem = await probe
    except TimeoutError:
        return f"no answer within {within:g} s"
    except ZtpError as exc:
        return f"{type(exc).__name__}: {exc}"
    return problem or "ok"


def _app(state: _State) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        tracker = state.tracker_task
        tasks = {
            "consumer": state.consumer is not None,
            "delivery_tracker": tracker is not None and not tracker.done(),
        }
        alive = all(tasks.values())
        return _json({"alive": alive, "tasks": tasks}, 200 if alive else 503)

    async def readyz(_request: web.Request) -> web.Response:
        if state.consumer is None or state.stopping:
            reason = "stopping" if state.stopping else "starting"
            return _json({"ready": False, "reason": reason}, 503)
        timeout = state.config.http.probe_timeout
        stream, airvantage = await asyncio.gather(
            _check(_probe_stream(state), timeout), _check(_probe_airvantage(state), timeout)
        )
        checks = {"stream": stream, "airvantage": airvantage}
        failed = {name: result for name, result in checks.items() if result != "ok"}
        if failed:
            _log.warning("service.not_ready", **failed)
            reason = "; ".join(f"{name}: {result}" for name, result in failed.items())
            return _json({"ready": False, "reason": reason, "checks": checks}, 503)
        return _json({"ready": True, "checks": checks}, 200)

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(state.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def _stores(
    config: CloudConfig, stack: contextlib.AsyncExitStack, session: Any
) -> tuple[LeaseStore, IssuanceLedger]:
    store = config.store
    if store.kind is StoreKind.SQLITE:
        await asyncio.to_thread(store.path.mkdir, parents=True, exist_ok=True)
        leases = await stack.enter_async_context(SqliteLeaseStore(store.path / "leases.sqlite3"))
        ledger = await stack.enter_async_context(SqliteLedger(store.path / "ledger.sqlite3"))
        return leases, ledger
    dynamodb = await stack.enter_async_context(
        session.create_client("dynamodb", **_aws_kwargs(config))
    )
    lease_table, ledger_table = store.lease_table or "", store.ledger_table or ""
    if store.create_tables:
        for create, table in (
            (create_lease_table, lease_table),
            (create_ledger_table, ledger_table),
        ):
            try:
                await create(dynamodb, table)
            except AwsServiceError as exc:
                if exc.code != "ResourceInUseException":  # it exists: fine
                    raise
    return DynamoLeaseStore(dynamodb, lease_table), DynamoLedger(dynamodb, ledger_table)


async def serve(
    config: CloudConfig,
    *,
    shutdown: Callable[[], Awaitable[object]],
    ready: asyncio.Event | None = None,
) -> None:
    """Run the cloud daemon until ``shutdown()`` returns, then stop in order.

    Args:
        config: the checked configuration.
        shutdown: awaited once everything runs; when it returns, the service stops.
        ready: set once the consumer runs and the HTTP server listens.

    Raises:
        ZtpError: a component could not start (a missing stream, an unreachable store), or the
            consumer failed for good.
    """
    session = get_session()
    aws = _aws_kwargs(config)
    metrics = CloudMetrics()
    async with contextlib.AsyncExitStack() as stack:
        kinesis = await stack.enter_async_context(session.create_client("kinesis", **aws))
        iot = await stack.enter_async_context(session.create_client("iot", **aws))
        leases, ledger = await _stores(config, stack, session)
        client = await stack.enter_async_context(AirVantageClient(config.airvantage_config()))
        state = _State(config, kinesis, client, metrics)
        metrics.registry.register(_ShardCollector(state.shard_metrics))

        runner = web.AppRunner(_app(state), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, config.http.host, config.http.port)
        await site.start()
        port = _bound_port(runner, config.http.port)

        issuer = Issuer(
            iot=_ThrottleCounter(iot, metrics),
            ledger=ledger,
            limiter=RateLimiter(
                default_tps=config.iot.tps,
                per_api=config.iot.rates(),
                margin=config.iot.tps_margin,
            ),
            config=config.issuer_config(),
        )
        deliveries = DeliveryLoop(
            tracker=DeliveryTracker(
                attempts=config.airvantage.delivery_attempts,
                operation_timeout=config.airvantage.operation_timeout,
                poll_interval=config.airvantage.poll_interval,
                first_poll=config.airvantage.first_poll,
            ),
            client=client,
            metrics=metrics,
        )
        tasks = await stack.enter_async_context(asyncio.TaskGroup())
        state.tracker_task = tasks.create_task(deliveries.run(), name="ztp-delivery-tracker")
        stack.callback(state.tracker_task.cancel, "service stopping")
        handler = ShardHandler(
            intake=Intake(), issuer=issuer, client=client, deliveries=deliveries, metrics=metrics
        )
        consumer = StreamConsumer(
            kinesis=kinesis,
            leases=leases,
            handler=handler,
            config=config.consumer_config(),
            dead_letter=JsonLinesDeadLetter(config.store.path / "dead-letters.jsonl"),
        )
        state.consumer = await stack.enter_async_context(consumer)
        _log.info(
            "service.ready",
            port=port,
            stream=config.kinesis.stream,
            worker_id=config.kinesis.worker_id,
            store=config.store.kind.value,
        )
        if ready is not None:
            ready.set()
        await shutdown()
        state.stopping = True
        _log.info("service.stopping", timeout=config.shutdown_timeout)
        try:
            async with asyncio.timeout(config.shutdown_timeout):
                await stack.aclose()
        except TimeoutError:
            _log.error("service.stop_timeout", timeout=config.shutdown_timeout)
            raise
    _log.info("service.stopped")


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured
