"""The device daemon's supervisor: the async driver of the provisioning machine.

Theory of operation
===================

:func:`serve` builds the pieces from the configuration (state file, key store, bundle store, the
:class:`~ztp_daemon.machine.ProvisioningMachine` resumed from the stored record, the
:class:`~ztp_daemon.link.AirVantageLink`) and runs a :class:`Supervisor` until ``shutdown()``
returns. The supervisor decides nothing itself: it feeds events to the machine and performs the
actions the machine returns, honouring the machine's driver contract:

1. One *inbox* (an :class:`asyncio.Queue`) receives everything that happens outside: the link's
   ``Connected``/``Disconnected``/``TaskArrived`` (translated to ``LinkUp``/``LinkDown``/
   ``TaskReceived``) and the expiry of the one timer. One task, ``supervisor.machine``, takes
   items from it one at a time.
2. The actions of one batch are performed in order. A storage action (``MakeKey``, ``Persist``,
   ``StoreCredentials``) is the last of its batch; its completion (``KeyReady``, ``Persisted``,
   ``CredentialsStored`` or ``StorageFailed``) is fed straight back, before the inbox is read
   again, so tasks and timers that arrive meanwhile wait in the inbox, as the contract asks.
   Blocking file work (key generation, fsyncs) runs in a worker thread.
3. One timer (the retry timer, or in PROVISIONED the renewal check): ``ScheduleRetry``
   re-arms it with ``loop.call_later`` and a new generation number, ``CancelRetry`` disarms it;
   an expiry that reaches the inbox after it was re-armed or disarmed carries an old
   generation and is dropped, so ``TimerFired`` is fed only for the armed timer. No polling
   anywhere: the loop sleeps on the inbox.
4. Link-bound actions (``PublishRequest``, ``AckTask``, ``ReportStatus``) go over the link. The
   machine holds them itself while it knows the link is down; one that fails anyway (the
   connection dropped under it) is kept and sent again after the next ``LinkUp``, before what
   the machine hands back then (an older request is dropped when a newer one is due).
5. Tasks the machine cannot be asked about (not a command, a uid it cannot hold) are acked
   ERROR directly.
6. ``StartPublisher`` enters the *publisher factory* (a seam: any callable taking the committed
   :class:`~ztp_daemon.bundle.Bundle` and returning an async context manager) in a task named
   ``supervisor.publisher``, held open until shutdown. The publisher is also started at once,
   before the machine, whenever a bundle is committed, whatever the state (a daemon killed
   mid-renewal, or between a commit and its record, publishes on the bundle it has); there is
   never a second publisher task. A renewal commits a new bundle version, which the publisher
   notices by itself (it follows the bundle store) and reconnects with. When what it enters
   can be watched (it has ``attach_watchdog``, as :class:`~ztp_daemon.publisher.Publisher`
   does), its loops are registered with the systemd watchdog from then on, beside the machine
   loop; it unregisters them when it stops.

Shutdown: when ``shutdown()`` returns, the machine loop first finishes the item it is working
on, within ``drain_timeout`` (5 s): a gateway stopped just after its bundle became durable still
acks the delivery and reports ``provisioned``, instead of leaving the cloud without the news (it
would only hear it at the next start) and the superseded certificates active. Then the machine
task is cancelled (a storage action in a worker thread completes: files are written atomically
either way), then the publisher, then the link; the timer is disarmed. A send still unsent then
is lost to this run only: a machine resumed PROVISIONED reports again. ``ready`` is set once
the machine has been started and the link is connecting. With systemd, READY/STATUS/STOPPING
are reported and the watchdog is pinged while the machine loop and the publisher's loops turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias, runtime_checkable

import structlog

from shared.airvantage import Ack, CommandTask, DataShape, OtherTask
from shared.messages import (
    CertificateRequest,
    Provisioned,
    Rejected,
    request_data_points,
    status_data_point,
)
from ztp_daemon.bundle import Bundle, BundleStore
from ztp_daemon.config import DeviceConfig
from ztp_daemon.csr import CsrSubject
from ztp_daemon.errors import IllegalTransitionError, LinkError, StorageError
from ztp_daemon.keystore import FileKeyStore, KeyStore
from ztp_daemon.link import (
    AirVantageLink,
    Connected,
    Disconnected,
    LinkEvent,
    LinkSettings,
    TaskArrived,
)
from ztp_daemon.machine import (
    RENEWAL_STATES,
    AckTask,
    Action,
    CancelRetry,
    CredentialsStored,
    DiscardKey,
    Input,
    KeyReady,
    LinkDown,
    LinkUp,
    MachineConfig,
    MakeKey,
    Persist,
    Persisted,
    ProvisioningMachine,
    PublishRequest,
    ReportStatus,
    ScheduleRetry,
    SharedCodecDecoder,
    Start,
    StartPublisher,
    State,
    StorageFailed,
    StoreCredentials,
    TaskReceived,
    TimerFired,
)
from ztp_daemon.sdnotify import Notifier, Watchdog
from ztp_daemon.state import StateFile

__all__ = [
    "BUNDLE_DIRECTORY",
    "DRAIN_TIMEOUT",
    "MACHINE_TASK_NAME",
    "PUBLISHER_TASK_NAME",
    "PublisherFactory",
    "Supervisor",
    "WatchablePublisher",
    "link_settings",
    "serve",
]

MACHINE_TASK_NAME: Final = "supervisor.machine"
#: How long shutdown waits for the machine loop to finish the item in progress, seconds.
DRAIN_TIMEOUT: Final = 5.0
PUBLISHER_TASK_NAME: Final = "supervisor.publisher"
#: Where the credential bundles live, under the state directory.
BUNDLE_DIRECTORY: Final = "bundles"
_MAX_ACK_MESSAGE: Final = 255

#: The seam to the IoT publisher: given the committed bundle, an async context manager that
#: publishes while it is open.
PublisherFactory: TypeAlias = Callable[[Bundle], AbstractAsyncContextManager[object]]

_log = structlog.get_logger()


@runtime_checkable
class WatchablePublisher(Protocol):
    """A publisher whose main loops the systemd watchdog can watch (the IoT publisher is one).

    Checked structurally, so the supervisor need not import the publisher (and aiomqtt) before
    the device is provisioned.
    """

    def attach_watchdog(self, watchdog: Watchdog) -> None:
        """Register its loops with ``watchdog`` and beat them until it stops."""
        ...


@dataclass(frozen=True, slots=True)
class _TimerExpired:
    """The timer of this generation expired."""

    generation: int


@dataclass(frozen=True, slots=True)
class _RefuseTask:
    """A task the machine cannot be asked about: ack ERROR directly."""

    uid: str
    message: str


_Item: TypeAlias = Input | _TimerExpired | _RefuseTask
_LINK_BOUND = (PublishRequest, AckTask, ReportStatus)


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def _ack_message(text: str) -> str:
    """An ack message AirVantage accepts: printable, 1..255 characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip() or "error"
    return cleaned[:_MAX_ACK_MESSAGE]


def link_settings(config: DeviceConfig, serial: str) -> LinkSettings:
    """The link settings for ``serial`` from the ``[airvantage]`` section.

    Raises:
        ConfigError: a value the link refuses.
    """
    section = config.airvantage
    return LinkSettings(
        serial=serial,
        password=section.password,
        host=section.host,
        port=section.port,
        tls=section.tls,
        ca_file=section.ca_file,
        keepalive=section.keepalive,
        connect_timeout=section.connect_timeout,
        publish_timeout=section.publish_timeout,
        backoff_base=section.backoff_base,
        backoff_cap=section.backoff_cap,
        min_connect_interval=section.min_connect_interval,
    )


class Supervisor:
    """Drives one :class:`ProvisioningMachine` over the link and the stores.

    Args:
        machine: the machine, resumed from the stored record (or fresh).
        serial: the gateway's serial.
        subject: the CSR subject.
        keystore: where the key is made and kept until the bundle holds it.
        state_file: where the machine's records are persisted.
        bundles: where credential bundles are committed.
        link_settings: how to reach AirVantage.
        publisher_factory: what to start once provisioned (``None``: nothing).
        notifier: systemd notifications (``None``: none).
        rng: the source of the link's backoff jitter.
        clock: the wall clock in epoch seconds (the machine's ``now``, timestamps).
        drain_timeout: how long shutdown waits for the item in progress, seconds.
    """

    def __init__(
        self,
        *,
        machine: ProvisioningMachine,
        serial: str,
        subject: CsrSubject,
        keystore: KeyStore,
        state_file: StateFile,
        bundles: BundleStore,
        link_settings: LinkSettings,
        publisher_factory: PublisherFactory | None = None,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self._machine = machine
        self._drain_timeout = drain_timeout
        # Set while the machine loop waits for its next item (nothing half done).
        self._idle = asyncio.Event()
        self._serial = serial
        self._subject = subject
        self._keystore = keystore
        self._state_file = state_file
        self._bundles = bundles
        self._link_settings = link_settings
        self._publisher_factory = publisher_factory
        self._notifier = notifier or Notifier(address=None)
        self._rng = rng
        self._clock = clock
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._link: AirVantageLink | None = None
        self._group: asyncio.TaskGroup | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_generation = 0
        self._unsent: list[Action] = []
        self._publisher_task: asyncio.Task[None] | None = None
        self._watchdog: Watchdog | None = None
        self._reported_state: State | None = None
        self._log = _log.bind(serial=serial)

    @property
    def state(self) -> State:
        """The machine's current state."""
        return self._machine.state

    # -- running -------------------------------------------------------------------------------

    async def run(
        self,
        *,
        shutdown: Callable[[], Awaitable[None]],
        ready: asyncio.Event | None = None,
    ) -> None:
        """Provision (or resume), then keep the publisher running, until ``shutdown()`` returns.

        Args:
            shutdown: awaited while the daemon runs; its return starts the shutdown.
            ready: set once the machine has started and the link is connecting.

        Raises:
            UsageError: the link settings are unusable (a CA file that does not load).
        """
        self._log.info(
            "supervisor.starting",
            state=self._machine.state.value,
            attempts=self._machine.record.attempts if self._machine.record else 0,
        )
        async with contextlib.AsyncExitStack() as stack:
            watchdog = Watchdog(notifier=self._notifier)
            watchdog.register("machine")
            self._watchdog = await stack.enter_async_context(watchdog)
            self._link = await stack.enter_async_context(
                AirVantageLink(self._link_settings, on_event=self._on_link_event, rng=self._rng)
            )
            stack.callback(self._disarm)
            group = await stack.enter_async_context(asyncio.TaskGroup())
            self._group = group
            await self._start_publisher(None)
            await self._feed(Start())
            machine_task = group.create_task(self._machine_loop(), name=MACHINE_TASK_NAME)
            self._notifier.ready(status=self._status_line())
            if ready is not None:
                ready.set()
            await shutdown()
            self._log.info("supervisor.stopping", state=self._machine.state.value)
            self._notifier.stopping()
            await self._drain()
            machine_task.cancel("shutdown")
            if self._publisher_task is not None:
                self._publisher_task.cancel("shutdown")
        self._log.info("supervisor.stopped", state=self._machine.state.value)

    async def _drain(self) -> None:
        """Let the machine loop finish the item in progress (its sends), within the bound."""
        if self._idle.is_set():
            return
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self._idle.wait()
        except TimeoutError:
            self._log.warning(
                "supervisor.drain_timeout",
                timeout_s=self._drain_timeout,
                state=self._machine.state.value,
            )

    def _on_link_event(self, event: LinkEvent) -> None:
        """Called by the link's task: translate and queue, never block."""
        match event:
            case Connected():
                self._inbox.put_nowait(LinkUp())
            case Disconnected():
                self._inbox.put_nowait(LinkDown())
            case TaskArrived(task=CommandTask() as task):
                try:
                    item: _Item = TaskReceived(task.uid, task.command_id, dict(task.params))
                except (ValueError, TypeError) as exc:
                    item = _RefuseTask(task.uid, f"task refused: {exc}")
                self._inbox.put_nowait(item)
            case TaskArrived(task=OtherTask() as other):
                kinds = ", ".join(other.kinds) or "none"
                message = f"not a command task (has: {kinds}); only commands are supported"
                self._inbox.put_nowait(_RefuseTask(other.uid, message))

    async def _next_item(self) -> _Item:
        self._idle.set()
        try:
            return await self._wait_item()
        finally:
            self._idle.clear()

    async def _wait_item(self) -> _Item:
        watchdog = self._watchdog
        period = watchdog.beat_period if watchdog is not None else None
        if watchdog is None or period is None:
            return await self._inbox.get()
        # Under systemd's watchdog the loop wakes to say it is alive even when nothing happens.
        while True:
            watchdog.beat("machine")
            try:
                async with asyncio.timeout(period):
                    return await self._inbox.get()
            except TimeoutError:
                continue

    async def _machine_loop(self) -> None:
        while True:
            item = await self._next_item()
            match item:
                case _TimerExpired(generation=generation):
                    if self._timer is None or generation != self._timer_generation:
                        continue  # re-armed or disarmed after this expiry was queued
                    self._timer = None
                    await self._feed(TimerFired())
                case _RefuseTask(uid=uid, message=message):
                    self._log.warning("task.refused", task=uid, reason=message)
                    await self._send(AckTask(uid, ok=False, message=message))
                case _:
                    await self._feed(item)

    async def _feed(self, first: Input) -> None:
        """Feed one event, perform its actions, and feed back storage completions."""
        pending: deque[Input] = deque([first])
        while pending:
            event = pending.popleft()
            try:
                actions = self._machine.handle(event, now=self._clock())
            except IllegalTransitionError as exc:
                # A driver bug, never the peer's doing: say so loudly and carry on unchanged.
                self._log.error(
                    "supervisor.illegal_event", event=exc.event, state=exc.state, reason=exc.reason
                )
                continue
            if isinstance(event, LinkUp):
                actions = self._with_unsent(actions)
            for action in actions:
                completion = await self._perform(action)
                if completion is not None:
                    pending.append(completion)
            self._report_state()

    def _with_unsent(self, actions: list[Action]) -> list[Action]:
        unsent, self._unsent = self._unsent, []
        if any(isinstance(a, PublishRequest) for a in actions):
            unsent = [a for a in unsent if not isinstance(a, PublishRequest)]
        return [*unsent, *actions]

    def _report_state(self) -> None:
        state = self._machine.state
        if state is not self._reported_state:
            self._reported_state = state
            self._log.info("provisioning.state", state=state.value)
            self._notifier.status(self._status_line())

    def _status_line(self) -> str:
        record = self._machine.record
        state = self._machine.state
        text = f"provisioning: {state.value}"
        if state in RENEWAL_STATES and record is not None:
            text += f", publishing on bundle v{record.bundle_version} meanwhile"
        if record is not None and record.attempts:
            text += f", request sent {record.attempts}x"
        if record is not None and record.last_error:
            text += f", last error: {record.last_error}"
        return text

    # -- actions -------------------------------------------------------------------------------

    async def _perform(self, action: Action) -> Input | None:
        """Perform one action; return the completion of a storage action."""
        match action:
            case MakeKey(fresh=fresh):
                return await self._make_key(fresh=fresh)
            case Persist(record=record):
                try:
                    await asyncio.to_thread(self._state_file.save, record)
                except StorageError as exc:
                    self._log.error("state.save_failed", reason=str(exc))
                    return StorageFailed(str(exc))
                return Persisted()
            case StoreCredentials():
                return await self._store(action)
            case ScheduleRetry(delay=delay):
                self._arm(delay)
            case CancelRetry():
                self._disarm()
            case PublishRequest() | AckTask() | ReportStatus():
                await self._send(action)
            case StartPublisher(bundle_version=version):
                await self._start_publisher(version)
                self._log_renewal_due()
            case DiscardKey():
                try:
                    await asyncio.to_thread(self._keystore.discard)
                except StorageError as exc:
                    # The bundle holds the key; a leftover pending key is only untidy.
                    self._log.warning("key.discard_failed", reason=str(exc))
            case _:  # pragma: no cover - every action type is matched above
                raise AssertionError(f"unhandled action {type(action).__name__}")
        return None

    def _log_renewal_due(self) -> None:
        due = self._machine.renew_at
        if due is not None:
            self._log.info("renewal.scheduled", due=_iso(due))

    async def _make_key(self, *, fresh: bool) -> Input:
        try:
            if fresh:
                # A renewal: a leftover pending key may be the very key of the bundle in use
                # (a discard that failed once); the new request must carry a new key.
                self._log.info("renewal.started", state=self._machine.state.value)
                await asyncio.to_thread(self._keystore.discard)
            handle = await asyncio.to_thread(self._keystore.load_or_create)
            csr_pem = await asyncio.to_thread(handle.sign_csr, self._subject)
        except StorageError as exc:
            self._log.error("key.unavailable", reason=str(exc))
            return StorageFailed(str(exc))
        return KeyReady(csr_pem)

    async def _store(self, action: StoreCredentials) -> Input:
        try:
            handle = await asyncio.to_thread(self._keystore.load)
            if handle is None:
                return StorageFailed("the pending key is missing")
            key_pem = handle.private_key_pem()
            version = await asyncio.to_thread(
                self._bundles.commit,
                certificate_pem=action.certificate_pem,
                endpoint=action.endpoint,
                certificate_id=action.certificate_id,
                key_pem=key_pem,
                key_reference=None if key_pem is not None else handle.reference,
            )
        except StorageError as exc:
            self._log.error("bundle.commit_failed", reason=str(exc))
            return StorageFailed(str(exc))
        return CredentialsStored(version)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer_generation += 1
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            delay, self._inbox.put_nowait, _TimerExpired(self._timer_generation)
        )
        self._log.info("retry.scheduled", delay_s=round(delay, 3))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _send(self, action: Action) -> None:
        link = self._link
        if link is None:  # pragma: no cover - run() opens the link before any action
            raise AssertionError
        try:
            match action:
                case PublishRequest(request_id=rid, csr_pem=csr_pem, attempt=attempt):
                    request = CertificateRequest(rid, self._serial, csr_pem)
                    # A distinct transfer per attempt: the cloud must not take a re-send for a
                    # duplicate of a transfer it already completed.
                    points = request_data_points(
                        request,
                        transfer_id=f"{rid[:24]}-{attempt}",
                        now_ms=int(self._clock() * 1000),
                        seq=attempt,
                    )
                    await link.publish_data(points, shape=DataShape.ARRAY)
                    self._log.info(
                        "request.sent", request_id=rid, attempt=attempt, fragments=len(points)
                    )
                case AckTask(uid=uid, ok=ok, message=message):
                    ack = Ack.ok(uid) if ok else Ack.error(uid, _ack_message(message or "error"))
                    await link.ack([ack])
                    self._log.info("task.acked", task=uid, status=ack.status.value, reason=message)
                case ReportStatus() as report:
                    status: Provisioned | Rejected = (
                        Provisioned(report.request_id, report.certificate_id)
                        if report.certificate_id is not None
                        else Rejected(report.request_id, report.reason or "unspecified")
                    )
                    point = status_data_point(status, timestamp_ms=int(self._clock() * 1000))
                    await link.publish_data([point], shape=DataShape.ARRAY)
                    self._log.info(
                        "status.reported",
                        provisioned=report.provisioned,
                        certificate_id=report.certificate_id,
                        reason=report.reason,
                    )
        except LinkError as exc:
            self._log.warning("link.send_deferred", action=type(action).__name__, reason=exc.reason)
            if not isinstance(action, AckTask):
                # An unacked task comes again from AirVantage; a request or report must be resent.
                self._unsent.append(action)

    async def _start_publisher(self, version: int | None) -> None:
        """Start the publisher on the committed bundle, once; ``version`` is what the machine
        recorded (``None`` at start-up, before the machine speaks)."""
        if self._publisher_task is not None:
            return
        try:
            bundle = await asyncio.to_thread(self._bundles.current)
        except StorageError as exc:
            self._log.error("bundle.unreadable", reason=str(exc))
            return
        if bundle is None:
            if version is not None:
                self._log.error("bundle.not_current", expected=version, found=None)
            return
        if version is not None and bundle.version != version:
            # Committed, but its record was lost to a kill: the bundle store is the truth the
            # publisher follows, and the machine catches up when the delivery comes again.
            self._log.warning("bundle.newer_than_record", recorded=version, found=bundle.version)
        self._log.info(
            "provisioned",
            bundle_version=bundle.version,
            certificate_id=bundle.certificate_id,
            endpoint=bundle.endpoint,
            state=self._machine.state.value,
        )
        factory = self._publisher_factory
        if factory is None or self._group is None:
            self._log.info("publisher.not_configured")
            return
        self._publisher_task = self._group.create_task(
            self._run_publisher(factory, bundle), name=PUBLISHER_TASK_NAME
        )

    async def _run_publisher(self, factory: PublisherFactory, bundle: Bundle) -> None:
        async with factory(bundle) as publisher:
            self._log.info("publisher.started", bundle_version=bundle.version)
            if isinstance(publisher, WatchablePublisher) and self._watchdog is not None:
                publisher.attach_watchdog(self._watchdog)
            # Held open until shutdown cancels this task; the context manager drains on exit.
            await asyncio.Event().wait()


async def serve(
    config: DeviceConfig,
    *,
    shutdown: Callable[[], Awaitable[None]],
    ready: asyncio.Event | None = None,
    publisher_factory: PublisherFactory | None = None,
    notifier: Notifier | None = None,
    rng: random.Random | None = None,
    serial: str | None = None,
) -> None:
    """Run the device daemon until ``shutdown()`` returns.

    Args:
        config: the loaded configuration.
        shutdown: awaited while the daemon runs (``__main__`` waits for SIGTERM/SIGINT).
        ready: set once provisioning has started (or resumed) and the link is connecting.
        publisher_factory: what to run once provisioned (``None``: nothing, provisioning only).
        notifier: systemd notifications (``None``: none).
        rng: the source of jitter (seed it in tests).
        serial: the serial, when the caller has already read it (``serial_command`` runs once).

    Raises:
        ConfigError: the serial cannot be read, or the CA bundle or a setting is unusable.
        StorageError: the stored state cannot be read (the daemon will not start afresh over
            it: that would make a second key).
    """
    if serial is None:
        serial = await asyncio.to_thread(config.read_serial)
    policy = await asyncio.to_thread(config.verify_policy)
    subject = config.csr_subject(serial)
    state_dir = config.device.state_dir
    state_file = StateFile(state_dir)
    record = await asyncio.to_thread(state_file.load)
    rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
    machine = ProvisioningMachine(
        MachineConfig(
            serial=serial,
            delivery_timeout=config.retry.first,
            retry_cap=config.retry.cap,
            verify=policy,
            renewal=config.renewal.policy(),
        ),
        decoder=SharedCodecDecoder(),
        rng=rng,
        record=record,
    )
    supervisor = Supervisor(
        machine=machine,
        serial=serial,
        subject=subject,
        keystore=FileKeyStore(state_dir, key_type=config.device.key_type),
        state_file=state_file,
        bundles=BundleStore(state_dir / BUNDLE_DIRECTORY),
        link_settings=link_settings(config, serial),
        publisher_factory=publisher_factory,
        notifier=notifier,
        rng=rng,
    )
    await supervisor.run(shutdown=shutdown, ready=ready)
