"""The suite-wide secret guard: no secret the suite knows may reach a log (issue #7).

Theory of operation
-------------------
A :class:`SecretRegistry` holds every secret value the suite has met, each with its kind
("device password", "AirVantage token", "private key", ...). It learns them from:

- the session sandbox (``tests/conftest.py``): its description (the AirVantage client secret,
  the gateways' passwords), the private keys under its directory, and, before every check, the
  gateways registered and the bearer tokens the emulator has issued since;
- tests, through the ``secret_registry`` fixture (``secret_registry.add(value, kind=...)``);
- the suite's modules, once collected: every string constant whose name ends in PASSWORD,
  PASSWD, PASSPHRASE, SECRET or TOKEN (``CLIENT_SECRET = "..."``);
- at the end of the run, under pytest's base temporary directory (the sandboxes and daemons
  tests ran on their own): every private key file, every ``sandbox.json`` description and every
  secret file (named password/secret/token, mode 0600, one word: what ``*_file`` settings read).

Two generic patterns need no registration: a PEM private key header and ``Bearer <token>``.

Where it looks:

1. After each phase (setup, call, teardown) of each test, the captured stdout, stderr and log
   sections of that phase, and every event a ``structlog.testing.capture_logs()`` block caught
   (its ``LogCapture`` is replaced for the session by a subclass that shows each event to the
   guard first), and the failure report of a phase that failed (an exception message). A
   phase that leaks fails, naming the section and the kind of secret; the sections and the
   failure report it shows are masked (``[secret guard: <kind>]``).
2. At the end of the run, every ``*.log`` file under the base temporary directory (daemon,
   mosquitto, moto and sandbox logs). A leak fails the run (exit status 1) and the summary
   names the file, the line and the kind.

A finding never holds the secret itself: only where it was and what kind it was.

Matching is cheap whatever the number of secrets: text is split into runs of base64/URL-safe
characters, and each 8-character window of a run is looked up in a dictionary of secret
prefixes (one lookup per character). Secrets with other characters are searched for directly.
For a private key the needles are the 64-character lines of its PEM body whose bytes are not
also part of its public key, so a logged certificate or CSR of the same key is no leak.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import pytest
import structlog.testing
from cryptography.hazmat.primitives import serialization
from structlog.testing import LogCapture
from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "MIN_SECRET_LENGTH",
    "Finding",
    "SecretGuard",
    "SecretRegistry",
    "guard_of",
    "private_key_needles",
    "scan_log_files",
    "secret_registry",
]

#: Shorter values are refused: they would match ordinary words and identifiers.
MIN_SECRET_LENGTH: Final = 8

_PREFIX: Final = MIN_SECRET_LENGTH
# Characters of hex, base64 and URL-safe base64 text ('=' left out: padding and key=value).
_RUN_CHARS: Final = "A-Za-z0-9_+/-"
_RUN: Final = re.compile(f"[{_RUN_CHARS}]{{{_PREFIX},}}")
_ALL_RUN_CHARS: Final = re.compile(f"[{_RUN_CHARS}]+")
_GENERIC: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"), "PEM private key block"),
    # The redactor leaves "Bearer [redacted]"; an error challenge ("Bearer error=...") is short.
    (re.compile(r"\bBearer\s+(?!\[)[A-Za-z0-9._~+/-]{16,}", re.IGNORECASE), "Bearer token"),
)
_PEM_BLOCK: Final = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(.*?)-----END \1PRIVATE KEY-----", re.DOTALL
)
_PEM_LINE: Final = 64
_KEY_FILE_LIMIT: Final = 64 * 1024
# Files never holding a PEM key: logs are what is scanned, databases are large and binary.
_NOT_KEY_FILES: Final = frozenset({".log", ".db", ".sqlite", ".sqlite3", ".wal", ".shm"})
# A test module's constant holding a secret: CLIENT_SECRET, DEVICE_PASSWORD, ADMIN_TOKEN...
_SECRET_NAME: Final = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN)$")
# A secret file (``password_file = ...``, ``*_SECRET_FILE``): named so, private, one token.
_SECRET_FILE_NAME: Final = re.compile(r"password|passwd|passphrase|secret|token", re.IGNORECASE)
_SECRET_VALUE: Final = re.compile(r"[A-Za-z0-9._~+=-]+")
_SECRET_FILE_LIMIT: Final = 1024


@dataclass(frozen=True, slots=True)
class Finding:
    """One leak: where a secret of some kind was seen. Never holds the secret.

    Attributes:
        where: a log file, or a test id with its phase and section.
        kind: what leaked ("device password", "PEM private key block", ...).
        line: the 1-based line in a file, when known.
    """

    where: str
    kind: str
    line: int | None = None

    def __post_init__(self) -> None:
        if not self.where or not self.kind:
            msg = "a finding needs a place and a kind"
            raise ValueError(msg)

    def describe(self) -> str:
        """Return ``where[:line]: kind``."""
        place = self.where if self.line is None else f"{self.where}:{self.line}"
        return f"{place}: {self.kind}"


def private_key_needles(pem: bytes) -> list[str]:
    """The distinctive pieces of every PEM private key in ``pem``.

    Args:
        pem: file contents holding zero or more PEM private key blocks.

    Returns:
        The full 64-character lines of each key's body, minus the lines whose bytes also appear
        in that key's public key (a certificate or CSR of the key shows those, legitimately).
    """
    needles: list[str] = []
    for match in _PEM_BLOCK.finditer(pem):
        lines = [line.strip().decode("ascii", "replace") for line in match.group(2).splitlines()]
        full = [line for line in lines if len(line) == _PEM_LINE and ":" not in line]
        public = _public_der(match.group(0))
        for line in full:
            try:
                chunk = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                continue
            if public is None or chunk not in public:
                needles.append(line)
    return needles


def _public_der(block: bytes) -> bytes | None:
    """The DER SubjectPublicKeyInfo of an unencrypted PEM private key, else None."""
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError):
        return None
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class SecretRegistry:
    """Every secret value the suite has met, with its kind; finds them in text.

    Thread-safe: the sandbox's thread may log while a check runs. Its ``repr`` shows counts,
    never values.
    """

    __slots__ = ("_lock", "_others", "_prefixes", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        # The first 8 characters of each secret made of run characters -> (secret, kind).
        self._prefixes: dict[str, list[tuple[str, str]]] = {}
        # Secrets with other characters, searched for as they are.
        self._others: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"SecretRegistry({len(self._values)} secrets)"

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def add(self, value: str, *, kind: str) -> None:
        """Register a secret; registering it again keeps its first kind.

        Args:
            value: the secret.
            kind: what it is, as findings will name it ("device password").

        Raises:
            ValueError: ``value`` is shorter than :data:`MIN_SECRET_LENGTH` (it would match
                ordinary text), or ``kind`` is empty.
        """
        if len(value) < MIN_SECRET_LENGTH:
            msg = f"a secret must have at least {MIN_SECRET_LENGTH} characters to be guarded"
            raise ValueError(msg)
        if not kind:
            msg = "a secret needs a kind"
            raise ValueError(msg)
        with self._lock:
            if value in self._values:
                return
            self._values[value] = kind
            if _ALL_RUN_CHARS.fullmatch(value):
                self._prefixes.setdefault(value[:_PREFIX], []).append((value, kind))
            else:
                self._others[value] = kind

    def add_all(self, values: Iterable[str], *, kind: str) -> None:
        """Register several secrets of one kind (see :meth:`add`)."""
        for value in values:
            self.add(value, kind=kind)

    def add_private_keys(self, pem: bytes, *, kind: str = "private key") -> int:
        """Register every PEM private key in ``pem`` (see :func:`private_key_needles`).

        Returns:
            How many needles were added.
        """
        needles = private_key_needles(pem)
        self.add_all(needles, kind=kind)
        return len(needles)

    def learn_private_keys(self, directory: Path) -> int:
        """Register the private keys of every small non-log file under ``directory``.

        Returns:
            How many needles were added.
        """
        added = 0
        for path in _files(directory):
            if path.suffix in _NOT_KEY_FILES:
                continue
            try:
                if path.stat().st_size > _KEY_FILE_LIMIT:
                    continue
                data = path.read_bytes()
            except OSError:
                continue  # removed meanwhile, or a socket: neither holds a key
            if b"PRIVATE KEY-----" in data:
                added += self.add_private_keys(data)
        return added

    def learn_description(self, document: Mapping[str, Any]) -> None:
        """Register the secrets of a sandbox description (``SandboxDescription.to_json()``).

        Unknown or malformed members are ignored: the guard must not fail on what it reads.
        """
        airvantage = document.get("airvantage")
        if isinstance(airvantage, Mapping):
            self.offer(airvantage.get("client_secret"), kind="AirVantage client secret")
        devices = document.get("devices")
        for device in devices if isinstance(devices, list) else ():
            if isinstance(device, Mapping):
                self.offer(device.get("password"), kind="device password")

    def learn_secret_files(self, directory: Path) -> int:
        """Register the contents of every secret file under ``directory``.

        A secret file, as the daemons' ``*_file`` settings read them: its name says password,
        secret or token; only its owner may read it (mode 0600 or stricter); it holds one
        word and nothing else.

        Returns:
            How many secrets were added.
        """
        added = 0
        for path in _files(directory):
            if not _SECRET_FILE_NAME.search(path.name) or path.suffix in _NOT_KEY_FILES:
                continue
            try:
                status = path.stat()
                if status.st_size > _SECRET_FILE_LIMIT or status.st_mode & (
                    stat.S_IRWXG | stat.S_IRWXO
                ):
                    continue
                text = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if _SECRET_VALUE.fullmatch(text) and self.offer(
                text, kind=f"secret read from {path.name}"
            ):
                added += 1
        return added

    def learn_module_constants(self, module: object) -> int:
        """Register the secrets a test module names as constants (``CLIENT_SECRET = "..."``).

        A constant counts when its name ends in PASSWORD, PASSWD, PASSPHRASE, SECRET or TOKEN
        and its value is one word of at least :data:`MIN_SECRET_LENGTH` characters.

        Returns:
            How many secrets were added.
        """
        added = 0
        name = getattr(module, "__name__", "?")
        for attribute, value in vars(module).items():
            if (
                _SECRET_NAME.search(attribute.lstrip("_"))
                and isinstance(value, str)
                and _SECRET_VALUE.fullmatch(value)
                and self.offer(value, kind=f"{name}.{attribute}")
            ):
                added += 1
        return added

    def learn_descriptions(self, directory: Path) -> None:
        """Register the secrets of every ``sandbox.json`` under ``directory``."""
        for path in directory.rglob("sandbox.json"):
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(document, Mapping):
                self.learn_description(document)

    def offer(self, value: object, *, kind: str) -> bool:
        """Register ``value`` if it is a string long enough to guard; never raises.

        For values learned from elsewhere (a description, the emulator), where a test's short
        password must not break the run.

        Returns:
            Whether the value is now registered.
        """
        if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH and kind:
            self.add(value, kind=kind)
            return True
        return False

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Locate the secrets in ``text``.

        Args:
            text: any text (a log, a captured section, an event's ``repr``).

        Returns:
            ``(start, end, kind)`` of each secret found, registered or matching a generic
            pattern, sorted; empty when clean.
        """
        found = [
            (match.start(), match.end(), kind)
            for pattern, kind in _GENERIC
            for match in pattern.finditer(text)
        ]
        with self._lock:
            for value, kind in self._others.items():
                at = text.find(value)
                while at >= 0:
                    found.append((at, at + len(value), kind))
                    at = text.find(value, at + 1)
            prefixes = self._prefixes
            if prefixes:
                for match in _RUN.finditer(text):
                    run, offset = match.group(), match.start()
                    for start in range(len(run) - _PREFIX + 1):
                        candidates = prefixes.get(run[start : start + _PREFIX])
                        if candidates:
                            found += [
                                (offset + start, offset + start + len(value), kind)
                                for value, kind in candidates
                                if run.startswith(value, start)
                            ]
        return sorted(found)

    def kinds_in(self, text: str) -> set[str]:
        """Tell which kinds of secret ``text`` holds (see :meth:`spans`)."""
        return {kind for _start, _end, kind in self.spans(text)}

    def mask(self, text: str) -> str:
        """Replace every secret in ``text`` with ``[secret guard: <kind>]``."""
        pieces: list[str] = []
        done = 0
        for start, end, kind in self.spans(text):
            if end <= done:
                continue  # inside a secret already masked
            pieces += [text[done:start] if start > done else "", f"[secret guard: {kind}]"]
            done = end
        return "".join(pieces) + text[done:]

    def find_in_file(self, path: Path) -> list[Finding]:
        """Scan one file: the first line holding each kind of secret.

        Returns:
            One finding per kind (with its first line), empty when clean or unreadable.
        """
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        if not self.kinds_in(text):
            return []
        first: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            for kind in self.kinds_in(line):
                first.setdefault(kind, number)
        # A secret split across lines (a PEM body without its header) has no line of its own.
        for kind in self.kinds_in(text) - first.keys():
            first[kind] = 0
        return [
            Finding(str(path), kind, line or None)
            for kind, line in sorted(first.items(), key=lambda item: (item[1], item[0]))
        ]


def _files(directory: Path) -> Iterator[Path]:
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                yield path
        except OSError:
            continue


def scan_log_files(directory: Path, registry: SecretRegistry) -> list[Finding]:
    """Find the secrets in every ``*.log`` file under ``directory``.

    Args:
        directory: where to look (recursively).
        registry: the secrets to look for (the generic patterns are always looked for).

    Returns:
        The findings, by file, then line.
    """
    findings: list[Finding] = []
    for path in sorted(directory.rglob("*.log")):
        if path.is_file():
            findings += registry.find_in_file(path)
    return findings


# --------------------------------------------------------------------------------------------
# The pytest plugin

Source = Callable[[SecretRegistry], None]


@dataclass(slots=True)
class SecretGuard:
    """The session's guard: the registry, its live sources, and what was found.

    Attributes:
        registry: every secret known so far.
        findings: leaks found so far (tests that leaked, then log files).
        basetemp: pytest's base temporary directory, scanned at the end of the run.
        source_failures: how many times a live source could not be read.
        seconds: time spent checking (the guard's overhead on the run).
    """

    registry: SecretRegistry = field(default_factory=SecretRegistry)
    findings: list[Finding] = field(default_factory=list)
    basetemp: Path | None = None
    source_failures: int = 0
    seconds: float = 0.0
    _sources: list[Source] = field(default_factory=list)
    # The text of each event capture_logs() caught in the current phase, checked when it ends
    # (after the live sources are read: a token may be logged before the guard learns it).
    _events: list[str] = field(default_factory=list)
    # The sandbox's thread logs too, while a test's capture_logs() block is open.
    _events_lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, source: Source) -> Source:
        """Call ``source(registry)`` before every check, until :meth:`unwatch`.

        For secrets that appear while the run goes on (tokens the emulator issues).
        """
        self._sources.append(source)
        return source

    def unwatch(self, source: Source) -> None:
        """Stop calling ``source`` (after a last call, so nothing it knew is missed)."""
        if source in self._sources:
            self.refresh()
            self._sources.remove(source)

    def refresh(self) -> None:
        """Ask every live source for what it knows now.

        A source that fails (a wedged sandbox) is counted in :attr:`source_failures`, not
        raised: the test that wedged it fails on its own.
        """
        for source in list(self._sources):
            try:
                source(self.registry)
            except Exception:  # noqa: BLE001 - a check must not break the run; counted instead
                self.source_failures += 1

    def see_event(self, event_dict: EventDict) -> None:
        """Keep the text of one event a ``capture_logs()`` block caught, for the phase's check."""
        text = repr(event_dict)
        with self._events_lock:
            self._events.append(text)

    def check_phase(
        self, nodeid: str, when: str, sections: Iterable[tuple[str, str]]
    ) -> list[Finding]:
        """Check what one phase of one test captured.

        Args:
            nodeid: the test's id.
            when: ``setup``, ``call`` or ``teardown``.
            sections: the report's ``(title, text)`` sections (those of other phases are
                skipped: they were checked when their phase ended).

        Returns:
            The new findings (also added to :attr:`findings`).
        """
        began = time.perf_counter()
        self.refresh()
        found: list[Finding] = []
        for title, text in sections:
            if title.endswith(f" {when}"):
                found += [
                    Finding(f"{nodeid} ({title.lower()})", kind)
                    for kind in sorted(self.registry.kinds_in(text))
                ]
        with self._events_lock:
            events, self._events = self._events, []
        kinds = self.registry.kinds_in("\n".join(events)) if events else set()
        found += [
            Finding(f"{nodeid} (capture_logs events, {when})", kind) for kind in sorted(kinds)
        ]
        self.findings += found
        self.seconds += time.perf_counter() - began
        return found

    def check_failure(self, nodeid: str, when: str, text: str) -> list[Finding]:
        """Check the failure report of one phase (an exception message may hold a secret).

        Returns:
            The new findings (also added to :attr:`findings`).
        """
        found = [
            Finding(f"{nodeid} (failure report {when})", kind)
            for kind in sorted(self.registry.kinds_in(text))
        ]
        self.findings += found
        return found

    def check_log_files(self) -> list[Finding]:
        """Learn the keys and descriptions under the base temporary directory, then scan its
        ``*.log`` files.

        Returns:
            The new findings (also added to :attr:`findings`).
        """
        if self.basetemp is None or not self.basetemp.is_dir():
            return []
        began = time.perf_counter()
        self.registry.learn_private_keys(self.basetemp)
        self.registry.learn_secret_files(self.basetemp)
        self.registry.learn_descriptions(self.basetemp)
        found = scan_log_files(self.basetemp, self.registry)
        self.findings += found
        self.seconds += time.perf_counter() - began
        return found


_GUARD: Final = pytest.StashKey[SecretGuard]()
# The guards of the pytest sessions running now: the suite's, and that of a pytester run inside it.
_ACTIVE: Final[list[SecretGuard]] = []


def guard_of(config: pytest.Config) -> SecretGuard:
    """The session's guard (for suite-wide fixtures that feed it)."""
    return config.stash[_GUARD]


class _GuardedLogCapture(LogCapture):
    """``LogCapture`` that shows each event to the running secret guards before keeping it."""

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> NoReturn:
        for guard in _ACTIVE:
            guard.see_event(event_dict)
        super().__call__(logger, method_name, event_dict)


def pytest_configure(config: pytest.Config) -> None:
    guard = SecretGuard()
    config.stash[_GUARD] = guard
    _ACTIVE.append(guard)
    # capture_logs() builds its LogCapture by looking the class up in structlog.testing at each
    # call: replacing it there is how every capture_logs() block of the suite is seen.
    structlog.testing.LogCapture = _GuardedLogCapture  # type: ignore[misc]


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(_GUARD, None)
    if guard in _ACTIVE:
        _ACTIVE.remove(guard)
    if not _ACTIVE:
        structlog.testing.LogCapture = LogCapture  # type: ignore[misc]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    guard = guard_of(item.config)
    found = guard.check_phase(item.nodeid, call.when, report.sections)
    if report.outcome == "failed":
        # An exception message holding a secret is a leak too; the report shows it masked.
        found += guard.check_failure(item.nodeid, call.when, str(report.longrepr))
        _mask_longrepr(report, guard.registry)
    if found:
        # pytest shows a failed test's captured sections: show them without the secrets.
        report.sections = [(title, guard.registry.mask(text)) for title, text in report.sections]
        lines = "\n".join(f"  {finding.describe()}" for finding in found)
        message = f"secret guard: a secret reached the logs of this test\n{lines}"
        if report.outcome == "failed":
            report.sections.append(("secret guard", message))
        else:
            report.outcome = "failed"
            report.longrepr = message
    return report


def _mask_longrepr(report: pytest.TestReport, registry: SecretRegistry) -> None:
    text = str(report.longrepr)
    if registry.kinds_in(text):
        report.longrepr = registry.mask(text)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Test modules and their fixture modules are imported by now; their secret constants are
    # what the tests log in with.
    registry = guard_of(session.config).registry
    for name, module in list(sys.modules.items()):
        if name == "tests" or name.startswith("tests."):
            registry.learn_module_constants(module)


@pytest.fixture(scope="session", autouse=True)
def _secret_guard_basetemp(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Tell the guard where the run's temporary files are (scanned at the end)."""
    guard_of(pytestconfig).basetemp = tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def secret_registry(pytestconfig: pytest.Config) -> SecretRegistry:
    """The session's secret registry: add every secret a test makes itself."""
    return guard_of(pytestconfig).registry


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = guard_of(session.config)
    if guard.check_log_files() or guard.findings:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    guard = guard_of(config)
    if config.get_verbosity() > 0:
        terminalreporter.line(
            f"secret guard: {len(guard.registry)} secrets known, "
            f"{guard.seconds:.2f} s spent checking"
        )
    if guard.source_failures:
        terminalreporter.line(
            f"secret guard: a live secret source failed {guard.source_failures} time(s); "
            "secrets it would have added were not checked",
            yellow=True,
        )
    if not guard.findings:
        return
    terminalreporter.section("secret guard", sep="=", red=True, bold=True)
    for finding in guard.findings:
        terminalreporter.line(f"secret leaked: {finding.describe()}", red=True)
