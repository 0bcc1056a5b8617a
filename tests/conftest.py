"""Suite-wide fixtures. Tier-specific fixtures live beside their tests.

One sandbox per test session (:class:`sandbox.world.Sandbox`: PKI, device broker, IoT broker,
moto, the Kinesis stream and the AirVantage emulator), started on first use and stopped at the
end of the run. It runs on an event loop of its own in a background thread
(:class:`sandbox.world.SandboxThread`), so it does not care which loop each test runs on
(pytest-asyncio gives every test its own): reach it over the network through
``sandbox.description``, or run a coroutine on its loop with ``await sandbox.run(fn)`` /
``sandbox.run_sync(fn)``, where ``fn`` takes the :class:`~sandbox.world.Sandbox`. Never call the
sandbox's objects (emulator, brokers) directly from a test's loop.

- ``shared_sandbox``: the session's sandbox as it is (no reset).
- ``sandbox``: the same, reset for this test: moto emptied (knobs back to the start values, CRL
  empty), the stream made again, emulator faults cleared and held tasks released.
- ``unique_serial``: a serial no other test uses; ``sandbox_device``: a gateway registered with
  one (emulator system and device broker account, random password).

Systems, broker accounts and certificates are not removed between tests: tests stay apart by
using fresh serials and thing names.

The secret guard (``tests/secret_guard.py``, loaded here for the whole suite) fails a test whose
captured output or ``capture_logs()`` events hold a secret, and the run when a ``*.log`` file
under the base temporary directory does. The session sandbox tells it its secrets (client
secret, device passwords, private keys, every token the emulator issues); a test that makes a
secret of its own adds it with the ``secret_registry`` fixture.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # Imported where used: aiobotocore and aiohttp cost ~0.5 s, which unit-only runs need not pay.
    from sandbox.world import DeviceCredentials, Sandbox, SandboxThread
    from tests.secret_guard import SecretRegistry

# pytester runs the secret guard's own tests in a pytest run of their own.
pytest_plugins = ("tests.secret_guard", "pytester")


async def _live_secrets(world: Sandbox) -> tuple[tuple[str, str], ...]:
    """The sandbox's secrets now, with their kinds, read on the sandbox's loop."""
    return (
        ("device broker admin password", world.device_broker.admin_password),
        *(("device password", device.password) for device in world.devices),
        *(("AirVantage token", token) for token in world.emulator.issued_tokens),
    )


@pytest.fixture(scope="session")
def shared_sandbox(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[SandboxThread]:
    """The session's sandbox (started on first use, stopped after the last test)."""
    from sandbox.world import SandboxThread

    # Imported here: pytest_plugins imports the guard first, so its asserts get rewritten.
    from tests.secret_guard import guard_of

    guard = guard_of(pytestconfig)
    with SandboxThread(tmp_path_factory.mktemp("sandbox")) as running:
        description = running.description
        guard.registry.learn_description(description.to_json())
        guard.registry.learn_private_keys(description.directory)

        def learn(registry: SecretRegistry) -> None:
            for kind, value in running.run_sync(_live_secrets, timeout=5.0):
                registry.offer(value, kind=kind)

        guard.watch(learn)
        try:
            yield running
        finally:
            guard.unwatch(learn)


@pytest.fixture
def sandbox(shared_sandbox: SandboxThread) -> SandboxThread:
    """The session's sandbox, reset for this test."""
    from sandbox.world import Sandbox

    shared_sandbox.run_sync(Sandbox.reset)
    return shared_sandbox


@pytest.fixture
def unique_serial() -> str:
    """A serial no other test uses (device account, client id and topic prefix)."""
    return f"SN{uuid.uuid4().hex[:12].upper()}"


@pytest.fixture
def sandbox_device(sandbox: SandboxThread, unique_serial: str) -> DeviceCredentials:
    """A gateway registered in the reset sandbox (emulator system and broker account)."""

    async def register(world: Sandbox) -> DeviceCredentials:
        return await world.register_device(unique_serial)

    return sandbox.run_sync(register)
