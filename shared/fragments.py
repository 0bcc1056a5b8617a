"""The fragment codec and reassembler: payloads cut into self-describing text fragments.

Theory of operation
-------------------

AirVantage carries string values of at most 255 characters, so a certificate (~1.2 KB of PEM)
or a CSR travels as several *fragments*, each a line of printable ASCII::

    Z1.<transfer_id>.<seq>.<index>.<count>.<tag>.<body>

The sender (:func:`split`) appends the 32-byte SHA-256 digest of the payload to the payload,
encodes the result once as unpadded base64url (the *stream*), and cuts the stream into bodies
of equal length (the last one may be shorter). Every header repeats the transfer id, the
sender's sequence number, the fragment's index, the fragment count, and a *tag*: the first 8
characters of the base64url digest. The full digest therefore costs 43 characters once per
transfer instead of once per fragment (a 1.3 KB certificate under a short transfer id takes
8 fragments instead of 9), while the 48-bit tag in every header lets a receiver tell apart
two payloads sent under the same transfer id at the first fragment, long before the digest can
be checked.

The receiver (:class:`Reassembler`) is a pure, synchronous object: fragment text in, a typed
outcome out, the current time passed in as ``now``. It keys transfers by ``(source,
transfer_id)`` (the source is the device serial on the cloud side, ``""`` on the device side):

- an exact duplicate (same transfer, index and body) is reported as :class:`Duplicate`, also
  after the transfer completed: the ids of the last ``max_completed`` completed transfers are
  remembered;
- a fragment that disagrees with what is held (different body for an index, or a different
  seq, count or tag for the transfer) raises :class:`~shared.errors.FragmentConflictError`;
- each source has a *newest seq*: a fragment starting a transfer with a higher seq supersedes
  (drops) the source's transfers with lower seqs; a fragment whose seq is below the newest one
  is answered :class:`Stale` (a late fragment of a superseded transfer is normal under
  at-least-once delivery, so it is an outcome, not an error). Transfers with the same seq
  coexist;
- at most ``max_transfers`` transfers are held at once; starting one more evicts the least
  recently active transfer (reported in the outcome's ``dropped``). Eviction rather than refusal
  because an abandoned transfer (a device rebooted mid-way) is exactly the one that has been
  idle longest, while refusing would let abandoned transfers block live ones until they
  expire. One source may hold at most ``max_transfers_per_source``; beyond that the offending
  source is refused (:class:`~shared.errors.LimitExceededError`) so it cannot evict others;
- a transfer idle for more than ``transfer_ttl`` seconds is dropped by :meth:`Reassembler.expire`,
  which :meth:`Reassembler.receive` also calls first;
- on completion the stream is decoded and the digest verified
  (:class:`~shared.errors.DigestMismatchError`); a failed transfer is dropped so a resend can
  start afresh.

The "Fragment format" section of ``README.md`` is the normative description of the format.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from shared.errors import (
    DigestMismatchError,
    FragmentConflictError,
    FragmentFormatError,
    LimitExceededError,
    UsageError,
)

__all__ = [
    "DIGEST_BYTES",
    "FORMAT_MAX_COUNT",
    "MAX_FRAGMENT_CHARS",
    "MAX_SEQ",
    "MAX_TRANSFER_ID_CHARS",
    "MIN_FRAGMENT_CHARS",
    "TAG_CHARS",
    "VERSION",
    "Accepted",
    "Completed",
    "DropReason",
    "Dropped",
    "Duplicate",
    "Fragment",
    "Outcome",
    "Reassembler",
    "ReassemblyLimits",
    "Stale",
    "UnsupportedVersionError",
    "parse_fragment",
    "split",
]

VERSION = "Z1"
"""Protocol version marker, the first header field."""

MAX_FRAGMENT_CHARS = 255
"""The largest fragment, in characters: AirVantage's string value limit."""

MAX_TRANSFER_ID_CHARS = 32
MAX_SEQ = 2**48 - 1
"""Largest sequence number: room for a millisecond Unix timestamp."""

FORMAT_MAX_COUNT = 9999
"""Largest fragment count the format allows (four decimal digits)."""

TAG_CHARS = 8
DIGEST_BYTES = 32

_SEP = "."
# Widest possible header: version, id, seq, index, count, tag and six separators (71 chars).
_MAX_HEADER_CHARS = (
    len(VERSION)
    + MAX_TRANSFER_ID_CHARS
    + len(str(MAX_SEQ))
    + 2 * len(str(FORMAT_MAX_COUNT))
    + TAG_CHARS
    + 6
)

MIN_FRAGMENT_CHARS = 96
"""Smallest ``max_chars`` accepted by :func:`split`: the widest header plus 25 body characters."""

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_TRANSFER_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TRANSFER_ID_CHARS}}}")
# Canonical decimals only (no sign, no leading zero), so every fragment has one spelling and an
# exact duplicate is textually identical.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,14}")
_VERSION = re.compile(r"Z[0-9]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


class UnsupportedVersionError(FragmentFormatError):
    """A well-formed fragment of a protocol version this code does not speak."""


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _digest_tag(payload_digest: bytes) -> str:
    return _encode(payload_digest)[:TAG_CHARS]


def _check_transfer_id(transfer_id: object) -> str:
    if not isinstance(transfer_id, str) or _TRANSFER_ID.fullmatch(transfer_id) is None:
        raise UsageError(
            f"transfer_id must be 1..{MAX_TRANSFER_ID_CHARS} characters of [A-Za-z0-9_-], "
            f"got {transfer_id!r:.60}"
        )
    return transfer_id


def split(
    payload: bytes,
    *,
    transfer_id: str,
    max_chars: int = MAX_FRAGMENT_CHARS,
    seq: int = 0,
) -> tuple[str, ...]:
    """Cut a payload into fragments that a :class:`Reassembler` puts back together.

    Args:
        payload: the bytes to send (any content, possibly empty).
        transfer_id: 1..32 characters of ``[A-Za-z0-9_-]``; unique per source for the lifetime
            of the receiver's memory of completed transfers.
        max_chars: the largest fragment, ``MIN_FRAGMENT_CHARS``..``MAX_FRAGMENT_CHARS``.
        seq: the sender's sequence number, ``0..MAX_SEQ``; a transfer with a higher seq
            supersedes the same source's transfers with lower ones.

    Returns:
        The fragments in index order, each printable ASCII and at most ``max_chars`` long.

    Raises:
        UsageError: an argument is out of range, or the payload needs more than
            ``FORMAT_MAX_COUNT`` fragments.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise UsageError(f"payload must be bytes, got {type(payload).__name__}")
    _check_transfer_id(transfer_id)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise UsageError(f"seq must be an integer 0..{MAX_SEQ}, got {seq!r:.60}")
    if (
        isinstance(max_chars, bool)
        or not isinstance(max_chars, int)
        or not MIN_FRAGMENT_CHARS <= max_chars <= MAX_FRAGMENT_CHARS
    ):
        raise UsageError(
            f"max_chars must be an integer {MIN_FRAGMENT_CHARS}..{MAX_FRAGMENT_CHARS}, "
            f"got {max_chars!r:.60}"
        )
    data = bytes(payload)
    digest = hashlib.sha256(data).digest()
    tag = _digest_tag(digest)
    stream = _encode(data + digest)
    fixed = len(VERSION) + len(transfer_id) + len(str(seq)) + TAG_CHARS + 6

    # The header widens with the digits of index and count, which depend on the count:
    # grow the count until it stops changing (it only ever grows, so this ends).
    count = 1
    while True:
        body_chars = max_chars - fixed - len(str(count - 1)) - len(str(count))
        needed = math.ceil(len(stream) / body_chars)
        if needed <= count:
            break
        count = needed
    if count > FORMAT_MAX_COUNT:
        raise UsageError(
            f"payload of {len(data)} bytes needs {count} fragments of {max_chars} characters, "
            f"more than the format's {FORMAT_MAX_COUNT}"
        )
    return tuple(
        Fragment(
            transfer_id=transfer_id,
            seq=seq,
            index=index,
            count=count,
            tag=tag,
            body=stream[index * body_chars : (index + 1) * body_chars],
        ).text()
        for index in range(count)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Fragment:
    """One parsed fragment; building one validates every field.

    Attributes:
        transfer_id: the sender's name for the transfer.
        seq: the sender's sequence number (newer transfers have higher ones).
        index: position of this fragment, ``0..count-1``.
        count: number of fragments in the transfer, ``1..FORMAT_MAX_COUNT``.
        tag: the first 8 characters of the base64url SHA-256 digest of the payload.
        body: this fragment's slice of the base64url stream.

    Raises:
        FragmentFormatError: a field is out of its range or alphabet (``field`` names it).
    """

    transfer_id: str
    seq: int
    index: int
    count: int
    tag: str
    body: str

    def __post_init__(self) -> None:
        if (
            not isinstance(self.transfer_id, str)
            or _TRANSFER_ID.fullmatch(self.transfer_id) is None
        ):
            raise FragmentFormatError(
                "header.transfer_id",
                f"1..{MAX_TRANSFER_ID_CHARS} characters of [A-Za-z0-9_-]",
                self.transfer_id,
            )
        _check_int("header.seq", self.seq, 0, MAX_SEQ)
        _check_int("header.count", self.count, 1, FORMAT_MAX_COUNT)
        _check_int("header.index", self.index, 0, self.count - 1)
        if (
            not isinstance(self.tag, str)
            or len(self.tag) != TAG_CHARS
            or _B64URL.fullmatch(self.tag) is None
        ):
            raise FragmentFormatError(
                "header.tag", f"{TAG_CHARS} characters of base64url", self.tag
            )
        if not isinstance(self.body, str) or _B64URL.fullmatch(self.body) is None:
            raise FragmentFormatError(
                "body", "1 or more characters of base64url [A-Za-z0-9_-]", self.body
            )

    def text(self) -> str:
        """Render the fragment in its wire form (the inverse of :func:`parse_fragment`)."""
        return _SEP.join(
            (
                VERSION,
                self.transfer_id,
                str(self.seq),
                str(self.index),
                str(self.count),
                self.tag,
                self.body,
            )
        )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FragmentFormatError(name, f"an integer {low}..{high}", value)


def _parse_decimal(name: str, text: str) -> int:
    if _DECIMAL.fullmatch(text) is None:
        raise FragmentFormatError(name, "a decimal integer without sign or leading zero", text)
    return int(text)


def parse_fragment(text: str) -> Fragment:
    """Parse one fragment's wire text.

    Args:
        text: the fragment, as received.

    Returns:
        The validated fragment; ``fragment.text() == text``.

    Raises:
        FragmentFormatError: the text is empty, too long, not printable ASCII, or a header
            field or the body is malformed (``field`` names which).
        UnsupportedVersionError: the fragment is of another protocol version.
    """
    if not isinstance(text, str):
        raise FragmentFormatError("fragment", "a string", type(text).__name__)
    if not text:
        raise FragmentFormatError("fragment", "a non-empty fragment", text)
    if not text.isascii() or _PRINTABLE.fullmatch(text) is None:
        raise FragmentFormatError("fragment", "printable ASCII only", text)
    if len(text) > MAX_FRAGMENT_CHARS:
        raise FragmentFormatError(
            "fragment", f"at most {MAX_FRAGMENT_CHARS} characters", f"{len(text)} characters"
        )
    parts = text.split(_SEP, 6)
    if parts[0] != VERSION:
        if _VERSION.fullmatch(parts[0]) is not None:
            raise UnsupportedVersionError("header.version", repr(VERSION), parts[0])
        raise FragmentFormatError("header.version", f"{VERSION!r} (a ztp fragment)", parts[0])
    if len(parts) < 7:
        raise FragmentFormatError(
            "header", "7 fields separated by '.': Z1.id.seq.index.count.tag.body", text
        )
    _, transfer_id, seq, index, count, tag, body = parts
    return Fragment(
        transfer_id=transfer_id,
        seq=_parse_decimal("header.seq", seq),
        index=_parse_decimal("header.index", index),
        count=_parse_decimal("header.count", count),
        tag=tag,
        body=body,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassemblyLimits:
    """Bounds a :class:`Reassembler` enforces; the defaults suit certificates and CSRs.

    Attributes:
        max_fragments: largest fragment count accepted for one transfer.
        max_payload_bytes: largest reassembled payload.
        max_transfers: transfers held at once, all sources together (least recently active
            evicted beyond it).
        max_transfers_per_source: transfers one source may hold at once (refused beyond it).
        max_completed: completed transfer ids remembered to recognise late duplicates.
        max_sources: sources whose newest seq is remembered (least recently active forgotten,
            never one holding a transfer).
        transfer_ttl: seconds a transfer may stay idle before it expires.

    Raises:
        UsageError: a bound is not positive, or ``max_sources < max_transfers``.
    """

    max_fragments: int = 64
    max_payload_bytes: int = 8192
    max_transfers: int = 256
    max_transfers_per_source: int = 4
    max_completed: int = 1024
    max_sources: int = 4096
    transfer_ttl: float = 900.0

    def __post_init__(self) -> None:
        for name in (
            "max_fragments",
            "max_payload_bytes",
            "max_transfers",
            "max_transfers_per_source",
            "max_completed",
            "max_sources",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"ReassemblyLimits.{name} must be a positive integer")
        if not isinstance(self.transfer_ttl, int | float) or not (
            math.isfinite(self.transfer_ttl) and self.transfer_ttl > 0
        ):
            raise UsageError("ReassemblyLimits.transfer_ttl must be a positive number of seconds")
        if self.max_fragments > FORMAT_MAX_COUNT:
            raise UsageError(f"ReassemblyLimits.max_fragments must be <= {FORMAT_MAX_COUNT}")
        if self.max_sources < self.max_transfers:
            raise UsageError("ReassemblyLimits.max_sources must be >= max_transfers")


class DropReason(enum.Enum):
    """Why a transfer in progress was dropped."""

    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped:
    """A transfer dropped before completion, and why.

    Attributes:
        source: who sent it.
        transfer_id: the transfer's id.
        seq: the transfer's sequence number.
        reason: expired, superseded or evicted.
        received: how many of its fragments were held.
        count: how many it announced.
    """

    source: str
    transfer_id: str
    seq: int
    reason: DropReason
    received: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """A new fragment was stored; the transfer is not complete yet.

    ``dropped`` lists the transfers this call dropped (expired, superseded or evicted).
    """

    source: str
    transfer_id: str
    index: int
    received: int
    count: int
    dropped: tuple[Dropped, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.received < self.count:
            raise UsageError(f"Accepted: received {self.received} of count {self.count}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate:
    """An exact copy of a fragment already held, or of one of a completed transfer."""

    source: str
    transfer_id: str
    index: int
    completed: bool
    dropped: tuple[Dropped, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    """The last missing fragment arrived and the payload matched its digest."""

    source: str
    transfer_id: str
    seq: int
    payload: bytes = field(repr=False)
    dropped: tuple[Dropped, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Stale:
    """A fragment of a transfer older than the source's newest one: ignored."""

    source: str
    transfer_id: str
    seq: int
    newest_seq: int
    dropped: tuple[Dropped, ...] = ()

    def __post_init__(self) -> None:
        if not self.seq < self.newest_seq:
            raise UsageError(f"Stale: seq {self.seq} is not below newest {self.newest_seq}")


Outcome = Accepted | Duplicate | Completed | Stale


@dataclass(slots=True, kw_only=True)
class _Transfer:
    source: str
    transfer_id: str
    seq: int
    count: int
    tag: str
    last_active: float
    bodies: dict[int, str] = field(default_factory=dict)
    chars: int = 0

    def dropped(self, reason: DropReason) -> Dropped:
        return Dropped(
            source=self.source,
            transfer_id=self.transfer_id,
            seq=self.seq,
            reason=reason,
            received=len(self.bodies),
            count=self.count,
        )

    def conflict(self, fragment: Fragment) -> FragmentConflictError | None:
        for name, held, got in (
            ("header.seq", self.seq, fragment.seq),
            ("header.count", self.count, fragment.count),
            ("header.tag", self.tag, fragment.tag),
        ):
            if held != got:
                return FragmentConflictError(
                    name, f"{held!r} as in this transfer's other fragments", got
                )
        return None


@dataclass(frozen=True, slots=True)
class _Done:
    seq: int
    count: int
    tag: str


@dataclass(slots=True)
class _Source:
    newest_seq: int
    active: set[str] = field(default_factory=set)


class Reassembler:
    """Puts fragments from one or many sources back together; pure and synchronous.

    Args:
        limits: the bounds to enforce (defaults suit certificates and CSRs).
    """

    def __init__(self, *, limits: ReassemblyLimits | None = None) -> None:
        self.limits = limits if limits is not None else ReassemblyLimits()
        # Insertion order is activity order: the first entry is the least recently active.
        self._transfers: OrderedDict[tuple[str, str], _Transfer] = OrderedDict()
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._completed: OrderedDict[tuple[str, str], _Done] = OrderedDict()

    @property
    def active(self) -> int:
        """Number of transfers in progress."""
        return len(self._transfers)

    def expire(self, *, now: float) -> tuple[Dropped, ...]:
        """Drop every transfer idle for more than ``limits.transfer_ttl`` seconds.

        Args:
            now: the current time in seconds (any monotonic clock, the same for every call).

        Returns:
            The transfers dropped, reason ``EXPIRED``.

        Raises:
            UsageError: ``now`` is not a finite number.
        """
        _check_now(now)
        deadline = now - self.limits.transfer_ttl
        stale = [t for t in self._transfers.values() if t.last_active < deadline]
        return tuple(self._drop(t, DropReason.EXPIRED) for t in stale)

    def receive(self, text: str, *, now: float, source: str = "") -> Outcome:
        """Take one fragment's wire text.

        Once the text parses, expired transfers are dropped first (reported in the outcome's
        ``dropped``; should the call then raise, they stay dropped, unreported).

        Args:
            text: the fragment as received.
            now: the current time in seconds (the clock :meth:`expire` is given).
            source: who sent it (the device serial on the cloud side; ``""`` for one peer).

        Returns:
            :class:`Accepted`, :class:`Duplicate`, :class:`Completed` or :class:`Stale`.

        Raises:
            FragmentFormatError: the text does not parse, or the stream does not decode.
            FragmentConflictError: the fragment disagrees with one held for the same transfer.
            DigestMismatchError: the completed payload does not match its digest.
            LimitExceededError: ``max_fragments``, ``max_payload_bytes`` or
                ``max_transfers_per_source`` would be exceeded.
            UsageError: ``now`` or ``source`` is invalid.
        """
        if not isinstance(source, str):
            raise UsageError(f"source must be a string, got {type(source).__name__}")
        # Parse before expiring, so that a malformed fragment changes nothing.
        fragment = parse_fragment(text)
        dropped = list(self.expire(now=now))
        key = (source, fragment.transfer_id)

        done = self._completed.get(key)
        if done is not None:
            if done != _Done(fragment.seq, fragment.count, fragment.tag):
                raise FragmentConflictError(
                    "header",
                    f"seq {done.seq}, count {done.count}, tag {done.tag!r} of the completed "
                    "transfer with this id",
                    f"seq {fragment.seq}, count {fragment.count}, tag {fragment.tag!r}",
                )
            self._completed.move_to_end(key)
            return Duplicate(
                source=source,
                transfer_id=fragment.transfer_id,
                index=fragment.index,
                completed=True,
                dropped=tuple(dropped),
            )

        transfer = self._transfers.get(key)
        if transfer is None:
            state = self._sources.get(source)
            if state is not None and fragment.seq < state.newest_seq:
                return Stale(
                    source=source,
                    transfer_id=fragment.transfer_id,
                    seq=fragment.seq,
                    newest_seq=state.newest_seq,
                    dropped=tuple(dropped),
                )
            transfer = self._start(fragment, source=source, now=now, dropped=dropped)
        else:
            conflict = transfer.conflict(fragment)
            if conflict is not None:
                raise conflict
            held = transfer.bodies.get(fragment.index)
            if held is not None:
                if held != fragment.body:
                    raise FragmentConflictError(
                        "body",
                        f"the {len(held)}-character body already held for index {fragment.index}",
                        f"a different {len(fragment.body)}-character body",
                    )
                transfer.last_active = now
                self._touch(transfer)
                return Duplicate(
                    source=source,
                    transfer_id=fragment.transfer_id,
                    index=fragment.index,
                    completed=False,
                    dropped=tuple(dropped),
                )
        return self._store(transfer, fragment, now=now, dropped=dropped)

    def _start(
        self, fragment: Fragment, *, source: str, now: float, dropped: list[Dropped]
    ) -> _Transfer:
        limits = self.limits
        if fragment.count > limits.max_fragments:
            raise LimitExceededError("max_fragments", limits.max_fragments, fragment.count)
        state = self._sources.get(source)
        if state is None:
            state = _Source(newest_seq=fragment.seq)
            self._sources[source] = state
        elif fragment.seq > state.newest_seq:
            # Every transfer held has a seq <= the newest, so a newer one supersedes them all.
            state.newest_seq = fragment.seq
            older = [self._transfers[(source, tid)] for tid in state.active]
            dropped.extend(self._drop(t, DropReason.SUPERSEDED) for t in older)
        elif len(state.active) >= limits.max_transfers_per_source:
            raise LimitExceededError(
                "max_transfers_per_source", limits.max_transfers_per_source, len(state.active) + 1
            )
        while len(self._transfers) >= limits.max_transfers:
            oldest = next(iter(self._transfers.values()))
            dropped.append(self._drop(oldest, DropReason.EVICTED))
        transfer = _Transfer(
            source=source,
            transfer_id=fragment.transfer_id,
            seq=fragment.seq,
            count=fragment.count,
            tag=fragment.tag,
            last_active=now,
        )
        self._transfers[(source, fragment.transfer_id)] = transfer
        state.active.add(fragment.transfer_id)
        self._sources.move_to_end(source)
        self._forget_idle_sources()
        return transfer

    def _store(
        self, transfer: _Transfer, fragment: Fragment, *, now: float, dropped: list[Dropped]
    ) -> Outcome:
        transfer.bodies[fragment.index] = fragment.body
        transfer.chars += len(fragment.body)
        transfer.last_active = now
        self._touch(transfer)
        # Every 4 stream characters carry 3 bytes, the last 32 of them the digest: this lower
        # bound on the payload size refuses an oversized transfer before it is all held.
        at_least = transfer.chars * 3 // 4 - DIGEST_BYTES
        if at_least > self.limits.max_payload_bytes:
            self._drop(transfer, DropReason.EVICTED)
            raise LimitExceededError("max_payload_bytes", self.limits.max_payload_bytes, at_least)
        if len(transfer.bodies) < transfer.count:
            return Accepted(
                source=transfer.source,
                transfer_id=transfer.transfer_id,
                index=fragment.index,
                received=len(transfer.bodies),
                count=transfer.count,
                dropped=tuple(dropped),
            )
        # Whatever the verdict, the transfer is finished: a failed one is dropped so that a
        # resend under a new transfer id (or the same one) can start afresh.
        self._drop(transfer, DropReason.EVICTED)
        payload = _verify(transfer)
        self._completed[(transfer.source, transfer.transfer_id)] = _Done(
            transfer.seq, transfer.count, transfer.tag
        )
        while len(self._completed) > self.limits.max_completed:
            self._completed.popitem(last=False)
        return Completed(
            source=transfer.source,
            transfer_id=transfer.transfer_id,
            seq=transfer.seq,
            payload=payload,
            dropped=tuple(dropped),
        )

    def _touch(self, transfer: _Transfer) -> None:
        self._transfers.move_to_end((transfer.source, transfer.transfer_id))
        self._sources.move_to_end(transfer.source)

    def _drop(self, transfer: _Transfer, reason: DropReason) -> Dropped:
        del self._transfers[(transfer.source, transfer.transfer_id)]
        self._sources[transfer.source].active.discard(transfer.transfer_id)
        return transfer.dropped(reason)

    def _forget_idle_sources(self) -> None:
        excess = len(self._sources) - self.limits.max_sources
        if excess <= 0:
            return
        # max_sources >= max_transfers, so enough sources hold no transfer to forget.
        idle = [name for name, state in self._sources.items() if not state.active][:excess]
        for name in idle:
            del self._sources[name]


def _check_now(now: object) -> None:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise UsageError(f"now must be a finite number of seconds, got {now!r:.60}")


def _verify(transfer: _Transfer) -> bytes:
    stream = "".join(transfer.bodies[index] for index in range(transfer.count))
    padded = stream + "=" * (-len(stream) % 4)
    try:
        data = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise FragmentFormatError(
            "body", "a valid base64url stream once joined", f"{len(stream)} characters"
        ) from exc
    if len(data) < DIGEST_BYTES or _encode(data) != stream:
        # A non-canonical spelling (stray low bits in the last character) or a stream too short
        # to hold the digest is refused, so one payload has exactly one set of fragments.
        raise FragmentFormatError(
            "body",
            f"a canonical base64url stream of at least {DIGEST_BYTES} bytes",
            f"{len(stream)} characters",
        )
    payload, announced = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    actual = hashlib.sha256(payload).digest()
    if actual != announced or _digest_tag(actual) != transfer.tag:
        raise DigestMismatchError(
            "digest",
            f"SHA-256 {_encode(announced)} (tag {transfer.tag})",
            _encode(actual),
        )
    return payload
