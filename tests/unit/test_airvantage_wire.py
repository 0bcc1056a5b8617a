"""AirVantage wire formats: device data shapes, tasks, acks, topics, Kinesis envelopes.

Samples are shaped exactly like DESIGN.md §3. Every bad input asserts the specific error type
and the field it names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.airvantage import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_TIMESTAMP_MS,
    Ack,
    AckStatus,
    CommandTask,
    DataPoint,
    DataShape,
    Event,
    IncomingCommunication,
    InvalidValueError,
    OperationStateChange,
    OtherEvent,
    OtherTask,
    Scalar,
    acks_topic,
    decode_json,
    encode_acks,
    encode_device_message,
    encode_envelope,
    encode_tasks,
    messages_topic,
    parse_acks,
    parse_device_message,
    parse_envelope,
    parse_tasks,
    tasks_topic,
    validate_serial,
)
from shared.errors import (
    LimitExceededError,
    MessageError,
    PeerError,
    UsageError,
    WireFormatError,
)

# -- device data: the three shapes of DESIGN.md §3 ---------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(b'{"ztp.csr": "abc"}', (DataPoint("ztp.csr", "abc"),), id="plain"),
        pytest.param(
            b'{"1349907137000": {"ztp.csr": "abc"}}',
            (DataPoint("ztp.csr", "abc", 1349907137000),),
            id="timestamped",
        ),
        pytest.param(
            b'[{"ztp.csr": [{"timestamp": 1416324560869, "value": "abc"}]}]',
            (DataPoint("ztp.csr", "abc", 1416324560869),),
            id="array",
        ),
        pytest.param(
            b'[{"ztp.request": [{"timestamp": 1, "value": "a"}, {"timestamp": 2, "value": "b"}]},'
            b' {"ztp.status": [{"timestamp": 3, "value": "c"}]}]',
            (
                DataPoint("ztp.request", "a", 1),
                DataPoint("ztp.request", "b", 2),
                DataPoint("ztp.status", "c", 3),
            ),
            id="array-several-values-and-elements",
        ),
        pytest.param(
            '{"a.b": 1, "a.c": 2.5, "a.d": true, "a.e": "é"}'.encode(),
            (
                DataPoint("a.b", 1),
                DataPoint("a.c", 2.5),
                DataPoint("a.d", value=True),
                DataPoint("a.e", "é"),
            ),
            id="plain-scalar-types",
        ),
        pytest.param(
            b'{"a.b": 1, "1349907137000": {"a.c": 2}}',
            (DataPoint("a.b", 1), DataPoint("a.c", 2, 1349907137000)),
            id="mixed-plain-and-timestamped",
        ),
        pytest.param(
            b'[{"a.b": [{"value": 7}]}]', (DataPoint("a.b", 7),), id="array-without-timestamp"
        ),
        pytest.param(
            b'[{"a.b": [{"timestamp": "1416324560869", "value": 7}]}]',
            (DataPoint("a.b", 7, 1416324560869),),
            id="array-timestamp-as-string",
        ),
        pytest.param(b"{}", (), id="empty-object"),
        pytest.param(b"[]", (), id="empty-array"),
        pytest.param('{"ztp.csr": "abc"}', (DataPoint("ztp.csr", "abc"),), id="text-payload"),
    ],
)
def test_parse_device_message_accepts_every_shape(
    payload: bytes | str, expected: tuple[DataPoint, ...]
) -> None:
    points = parse_device_message(payload)
    assert points == expected
    # Equality treats 1 == True == 1.0: compare types too.
    assert [type(p.value) for p in points] == [type(p.value) for p in expected]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param(b'"ztp.csr"', "payload", id="string-document"),
        pytest.param(b"42", "payload", id="number-document"),
        pytest.param(b"null", "payload", id="null-document"),
        pytest.param(b"{", "payload", id="truncated-json"),
        pytest.param(b"\xff\xfe{}", "payload", id="not-utf8"),
        pytest.param(b'{"a.b": NaN}', "payload", id="nan"),
        pytest.param(b'{"a.b": Infinity}', "payload", id="infinity"),
        pytest.param(b'{"a.b": 1, "a.b": 2}', "payload", id="duplicate-key"),
        pytest.param(b"[" * 5000 + b"]" * 5000, "payload", id="too-deep"),
        pytest.param(b'{"a.b": ' + b"9" * 5000 + b"}", "payload", id="huge-integer"),
        pytest.param(b'{"a.b": null}', "a.b", id="null-value"),
        pytest.param(b'{"a.b": {"c": 1}}', "a.b", id="object-under-non-timestamp-key"),
        pytest.param(b'{"123": 1}', "123", id="digit-only-path"),
        pytest.param(b'{"": 1}', "", id="empty-path"),
        pytest.param(b'{"a\\u0000b": 1}', "a\x00b", id="control-char-in-path"),
        pytest.param(b'{"1349907137000": {"a.b": [1]}}', "1349907137000.a.b", id="nested-list"),
        pytest.param(b'{"1349907137000": {"a.b": {"x": 1}}}', "1349907137000.a.b", id="deeper"),
        pytest.param(b'{"-5": {"a.b": 1}}', "-5", id="negative-timestamp-key"),
        pytest.param(b'{"99999999999999999": {"a.b": 1}}', "99999999999999999", id="ts-too-big"),
        pytest.param(b"[1]", "[0]", id="array-element-not-object"),
        pytest.param(b'[{"a.b": "x"}]', "[0].a.b", id="array-value-not-samples"),
        pytest.param(b'[{"a.b": [1]}]', "[0].a.b[0]", id="sample-not-object"),
        pytest.param(b'[{"a.b": [{"timestamp": 1}]}]', "[0].a.b[0].value", id="sample-no-value"),
        pytest.param(
            b'[{"a.b": [{"timestamp": true, "value": 1}]}]',
            "[0].a.b[0].timestamp",
            id="bool-timestamp",
        ),
        pytest.param(
            b'[{"a.b": [{"timestamp": 1.5, "value": 1}]}]',
            "[0].a.b[0].timestamp",
            id="fractional-timestamp",
        ),
        pytest.param(
            b'[{"a.b": [{"timestamp": "12x", "value": 1}]}]',
            "[0].a.b[0].timestamp",
            id="non-digit-timestamp-string",
        ),
        pytest.param(
            b'[{"a.b": [{"timestamp": -1, "value": 1}]}]',
            "[0].a.b[0].timestamp",
            id="negative-timestamp",
        ),
        pytest.param(
            b'[{"a.b": [{"timestamp": 1, "value": null}]}]',
            "[0].a.b[0].value",
            id="null-sample-value",
        ),
    ],
)
def test_parse_device_message_refuses_bad_input(payload: bytes, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_device_message(payload)
    assert caught.value.field == field
    assert isinstance(caught.value, PeerError)


def test_oversized_payload_is_refused_before_decoding() -> None:
    # Not even valid JSON: the size check must come first.
    payload = b"\xff" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)
    with pytest.raises(LimitExceededError) as caught:
        parse_device_message(payload)
    assert caught.value.limit_name == "max_payload_bytes"
    assert caught.value.limit == DEFAULT_MAX_PAYLOAD_BYTES
    assert caught.value.actual == DEFAULT_MAX_PAYLOAD_BYTES + 1


@pytest.mark.parametrize(
    "parse",
    [parse_device_message, parse_tasks, parse_acks, parse_envelope],
    ids=["messages", "tasks", "acks", "envelope"],
)
def test_every_parser_takes_a_configurable_bound(parse: Callable[..., object]) -> None:
    payload = b'[{"a.b": [{"timestamp": 1, "value": "' + b"x" * 100 + b'"}]}]'
    with pytest.raises(LimitExceededError) as caught:
        parse(payload, max_bytes=64)
    assert caught.value.limit == 64
    assert caught.value.actual == len(payload)


def test_text_payload_is_measured_in_utf8_bytes() -> None:
    text = '{"a.b": "' + "é" * 40 + '"}'  # 50 characters, 90 bytes
    with pytest.raises(LimitExceededError) as caught:
        parse_device_message(text, max_bytes=60)
    assert caught.value.actual == len(text.encode())


def test_decode_json_raises_the_requested_error_class() -> None:
    with pytest.raises(MessageError):
        decode_json(b"{", error=MessageError)


def test_lone_surrogate_in_text_is_a_wire_error() -> None:
    with pytest.raises(WireFormatError):
        parse_device_message('{"a.b": "\ud800"}')


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (DataShape.PLAIN, {"a.b": "x", "a.c": 2}),
        (DataShape.TIMESTAMPED, {"1349907137000": {"a.b": "x"}, "1349907137001": {"a.c": 2}}),
        (
            DataShape.ARRAY,
            [
                {
                    "a.b": [{"timestamp": 1349907137000, "value": "x"}],
                    "a.c": [{"timestamp": 1349907137001, "value": 2}],
                }
            ],
        ),
    ],
)
def test_encode_device_message_writes_each_shape(shape: DataShape, expected: object) -> None:
    stamped = shape is not DataShape.PLAIN
    points = (
        DataPoint("a.b", "x", 1349907137000 if stamped else None),
        DataPoint("a.c", 2, 1349907137001 if stamped else None),
    )
    payload = encode_device_message(points, shape=shape)
    assert json.loads(payload) == expected
    assert b" " not in payload  # compact
    assert parse_device_message(payload) == points


def test_array_shape_carries_several_values_of_one_path() -> None:
    points = tuple(DataPoint("ztp.request", f"frag{i}", 1000 + i) for i in range(5))
    payload = encode_device_message(points, shape=DataShape.ARRAY)
    assert json.loads(payload) == [
        {"ztp.request": [{"timestamp": 1000 + i, "value": f"frag{i}"} for i in range(5)]}
    ]
    assert parse_device_message(payload) == points


@pytest.mark.parametrize(
    ("shape", "points"),
    [
        pytest.param(DataShape.PLAIN, (DataPoint("a.b", 1, 5),), id="plain-with-timestamp"),
        pytest.param(DataShape.PLAIN, (DataPoint("a.b", 1), DataPoint("a.b", 2)), id="plain-dup"),
        pytest.param(DataShape.TIMESTAMPED, (DataPoint("a.b", 1),), id="timestamped-without"),
        pytest.param(
            DataShape.TIMESTAMPED,
            (DataPoint("a.b", 1, 5), DataPoint("a.b", 2, 5)),
            id="timestamped-dup",
        ),
        pytest.param(DataShape.ARRAY, (DataPoint("a.b", 1),), id="array-without-timestamp"),
    ],
)
def test_encode_device_message_refuses_what_the_shape_cannot_carry(
    shape: DataShape, points: tuple[DataPoint, ...]
) -> None:
    with pytest.raises(InvalidValueError):
        encode_device_message(points, shape=shape)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": "", "value": 1}, "path"),
        ({"path": "1234", "value": 1}, "path"),
        ({"path": "a\nb", "value": 1}, "path"),
        ({"path": "a" * 256, "value": 1}, "path"),
        ({"path": 5, "value": 1}, "path"),
        ({"path": "a.b", "value": None}, "value"),
        ({"path": "a.b", "value": [1]}, "value"),
        ({"path": "a.b", "value": float("nan")}, "value"),
        ({"path": "a.b", "value": float("inf")}, "value"),
        ({"path": "a.b", "value": 1, "timestamp_ms": -1}, "timestamp_ms"),
        ({"path": "a.b", "value": 1, "timestamp_ms": MAX_TIMESTAMP_MS + 1}, "timestamp_ms"),
        ({"path": "a.b", "value": 1, "timestamp_ms": True}, "timestamp_ms"),
        ({"path": "a.b", "value": 1, "timestamp_ms": 1.0}, "timestamp_ms"),
    ],
)
def test_data_point_validates_when_built(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        DataPoint(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert isinstance(caught.value, UsageError)


_paths = st.from_regex(r"[a-z][a-z0-9_]{0,8}\.[a-z][a-z0-9_.]{0,12}", fullmatch=True)
_scalars: st.SearchStrategy[Scalar] = st.one_of(
    st.text(max_size=40),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
_timestamps = st.integers(0, MAX_TIMESTAMP_MS)


def _same(a: tuple[DataPoint, ...], b: tuple[DataPoint, ...]) -> bool:
    return a == b and all(type(x.value) is type(y.value) for x, y in zip(a, b, strict=True))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_paths, _scalars, _timestamps), max_size=8))
def test_array_shape_round_trips(items: list[tuple[str, Scalar, int]]) -> None:
    points = tuple(DataPoint(p, v, t) for p, v, t in items)
    back = parse_device_message(encode_device_message(points, shape=DataShape.ARRAY))
    # The array shape groups values by path, first-seen order, keeping each path's order.
    order = list(dict.fromkeys(p.path for p in points))
    expected = tuple(sorted(points, key=lambda p: order.index(p.path)))
    assert _same(back, expected)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_paths, _scalars, max_size=8), st.sampled_from([None, 0, 1416324560869]))
def test_object_shapes_round_trip(values: dict[str, Scalar], timestamp: int | None) -> None:
    points = tuple(DataPoint(p, v, timestamp) for p, v in values.items())
    shape = DataShape.PLAIN if timestamp is None else DataShape.TIMESTAMPED
    assert _same(parse_device_message(encode_device_message(points, shape=shape)), points)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parse_device_message_never_raises_anything_untyped(payload: bytes) -> None:
    with contextlib.suppress(WireFormatError, LimitExceededError):
        parse_device_message(payload)


# -- topics and serials ------------------------------------------------------------------------


def test_topics() -> None:
    assert messages_topic("LL542500111003") == "LL542500111003/messages/json"
    assert tasks_topic("LL542500111003") == "LL542500111003/tasks/json"
    assert acks_topic("353270040000001") == "353270040000001/acks/json"


@pytest.mark.parametrize(
    "serial", ["LL542500111003", "353270040000001", "a", "gw-01_b.2", "x" * 64]
)
def test_valid_serials(serial: str) -> None:
    assert validate_serial(serial) == serial


@pytest.mark.parametrize(
    "serial",
    [
        "",
        "a/b",
        "a+b",
        "a#",
        "+",
        "#",
        "a\x00b",
        "$SYS",
        "a b",
        "a:b",
        "é",
        "-lead",
        "x" * 65,
        "a\n",
    ],
)
def test_unsafe_serials_are_refused(serial: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        validate_serial(serial)
    assert caught.value.field == "serial"
    with pytest.raises(InvalidValueError):
        messages_topic(serial)


def test_serial_must_be_a_string() -> None:
    with pytest.raises(InvalidValueError):
        validate_serial(42)  # type: ignore[arg-type]


# -- tasks and acks ----------------------------------------------------------------------------

_TASK_SAMPLE = (
    b'[{"uid": "8b9cc1d5a6f64ef1a2d0b4f9f1a9c0de", "timestamp": 1416324560869,'
    b' "command": {"id": "ztp.deliver", "params": {"f01": "Z1.abc", "f02": "Z1.def"}}}]'
)


def test_parse_tasks_sample() -> None:
    (task,) = parse_tasks(_TASK_SAMPLE)
    assert isinstance(task, CommandTask)
    assert task.uid == "8b9cc1d5a6f64ef1a2d0b4f9f1a9c0de"
    assert task.timestamp_ms == 1416324560869
    assert task.command_id == "ztp.deliver"
    assert dict(task.params) == {"f01": "Z1.abc", "f02": "Z1.def"}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            b'{"uid": "u1", "command": {"id": "c"}}',
            (CommandTask("u1", None, "c", {}),),
            id="single-object-no-timestamp-no-params",
        ),
        pytest.param(
            b'[{"uid": "u1", "timestamp": "1416324560869", "command": {"id": "c", "params":'
            b' {"n": 1, "b": false, "x": 1.5}}}]',
            (CommandTask("u1", 1416324560869, "c", {"n": 1, "b": False, "x": 1.5}),),
            id="string-timestamp-and-scalar-params",
        ),
        pytest.param(
            b'[{"uid": "u2", "timestamp": 5, "settings": [{"key": "a", "value": 1}]}]',
            (OtherTask("u2", 5, ("settings",)),),
            id="settings-task-is-other",
        ),
        pytest.param(b"[]", (), id="empty"),
    ],
)
def test_parse_tasks_shapes(payload: bytes, expected: tuple[object, ...]) -> None:
    assert parse_tasks(payload) == expected


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param(b'"x"', "payload", id="string-document"),
        pytest.param(b"[1]", "[0]", id="element-not-object"),
        pytest.param(b'[{"command": {"id": "c"}}]', "[0].uid", id="missing-uid"),
        pytest.param(b'[{"uid": 5, "command": {"id": "c"}}]', "[0].uid", id="uid-not-string"),
        pytest.param(b'[{"uid": "", "command": {"id": "c"}}]', "[0].uid", id="empty-uid"),
        pytest.param(
            b'[{"uid": "u", "timestamp": "soon", "command": {"id": "c"}}]',
            "[0].timestamp",
            id="bad-timestamp",
        ),
        pytest.param(b'[{"uid": "u", "command": "c"}]', "[0].command", id="command-not-object"),
        pytest.param(b'[{"uid": "u", "command": {}}]', "[0].command.id", id="missing-id"),
        pytest.param(
            b'[{"uid": "u", "command": {"id": ["c"]}}]', "[0].command.id", id="id-not-string"
        ),
        pytest.param(
            b'[{"uid": "u", "command": {"id": "c", "params": [1]}}]',
            "[0].command.params",
            id="params-not-object",
        ),
        pytest.param(
            b'[{"uid": "u", "command": {"id": "c", "params": {"f01": null}}}]',
            "[0].command.params.f01",
            id="null-param",
        ),
        pytest.param(
            b'[{"uid": "u", "command": {"id": "c", "params": {"f01": {"a": 1}}}}]',
            "[0].command.params.f01",
            id="object-param",
        ),
        pytest.param(
            b'[{"uid": "u", "command": {"id": "c", "params": {"": "x"}}}]',
            "[0].command.params",
            id="empty-param-key",
        ),
    ],
)
def test_parse_tasks_refuses_bad_input(payload: bytes, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_tasks(payload)
    assert caught.value.field == field


def test_tasks_round_trip() -> None:
    tasks = (
        CommandTask("u1", 1416324560869, "ztp.deliver", {"f01": "a", "f02": "b"}),
        CommandTask("u2", None, "other.cmd"),
    )
    payload = encode_tasks(tasks)
    assert json.loads(payload)[0] == {
        "uid": "u1",
        "timestamp": 1416324560869,
        "command": {"id": "ztp.deliver", "params": {"f01": "a", "f02": "b"}},
    }
    assert parse_tasks(payload) == tasks


def test_command_task_params_are_a_read_only_copy() -> None:
    given_params: dict[str, Scalar] = {"f01": "a"}
    task = CommandTask("u", None, "c", given_params)
    given_params["f02"] = "b"
    assert dict(task.params) == {"f01": "a"}
    with pytest.raises(TypeError):
        task.params["f03"] = "c"  # type: ignore[index]


@pytest.mark.parametrize(
    ("acks", "expected"),
    [
        ((Ack.ok("u1"),), [{"uid": "u1", "status": "OK"}]),
        (
            (Ack.error("u2", "fragment conflict"),),
            [{"uid": "u2", "status": "ERROR", "message": "fragment conflict"}],
        ),
        (
            (Ack.ok("u1"), Ack("u2", AckStatus.ERROR)),
            [{"uid": "u1", "status": "OK"}, {"uid": "u2", "status": "ERROR"}],
        ),
    ],
)
def test_acks_encode_and_round_trip(acks: tuple[Ack, ...], expected: object) -> None:
    payload = encode_acks(acks)
    assert json.loads(payload) == expected
    assert parse_acks(payload) == acks


def test_ack_helpers() -> None:
    assert Ack.ok("u").is_ok
    assert not Ack.error("u", "no").is_ok


def test_parse_acks_is_liberal_on_case_and_single_object() -> None:
    assert parse_acks(b'{"uid": "u", "status": "ok"}') == (Ack.ok("u"),)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param(b"5", "payload", id="number-document"),
        pytest.param(b'[{"status": "OK"}]', "[0].uid", id="missing-uid"),
        pytest.param(b'[{"uid": "u"}]', "[0].status", id="missing-status"),
        pytest.param(b'[{"uid": "u", "status": "MAYBE"}]', "[0].status", id="unknown-status"),
        pytest.param(b'[{"uid": "u", "status": 1}]', "[0].status", id="status-not-string"),
        pytest.param(
            b'[{"uid": "u", "status": "ERROR", "message": 5}]', "[0].message", id="bad-message"
        ),
        pytest.param(b'[{"uid": 5, "status": "OK"}]', "[0].uid", id="uid-not-string"),
    ],
)
def test_parse_acks_refuses_bad_input(payload: bytes, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_acks(payload)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "build",
    [
        lambda: Ack("", AckStatus.OK),
        lambda: Ack("u", "OK"),  # type: ignore[arg-type]
        lambda: Ack("u", AckStatus.ERROR, "x" * 256),
        lambda: Ack("u", AckStatus.ERROR, "line\nbreak"),
        lambda: CommandTask("", None, "c"),
        lambda: CommandTask("u", None, ""),
        lambda: CommandTask("u", -1, "c"),
        lambda: CommandTask("u", None, "c", {"k": None}),  # type: ignore[dict-item]
    ],
)
def test_tasks_and_acks_validate_when_built(build: Callable[[], object]) -> None:
    with pytest.raises(InvalidValueError):
        build()


# -- Kinesis connector envelopes ---------------------------------------------------------------

_FLAT_CONTENT = {
    "system.id": "c8d3e4f2a1b04e7d9f2e3a4b5c6d7e8f",
    "communication.id": "LL542500111003",
    "message.id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "ztp.request": "Z1.abc",
}
_FLAT = {
    "name": "event.system.incoming.communication",
    "date": 1403793930987,
    "content": _FLAT_CONTENT,
}
_NESTED = {
    "name": "event.system.incoming.communication",
    "date": "1403793930987",
    "content": {
        "system.id": "c8d3e4f2a1b04e7d9f2e3a4b5c6d7e8f",
        "communication.id": "LL542500111003",
        "message.id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "14037939309874": {"ztp.request": "Z1.abc", "ztp.status": "{}"},
    },
}
_STATE_CHANGE = {
    "name": "event.operation.state.change",
    "date": 1403793930987,
    "content": {
        "operation.uid": "op1",
        "operation.state.new": "FINISHED",
        "operation.counters": [{"state": "SUCCESS", "count": 1}, {"state": "FAILURE", "count": 0}],
    },
}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param(
            _FLAT,
            IncomingCommunication(
                "c8d3e4f2a1b04e7d9f2e3a4b5c6d7e8f",
                "LL542500111003",
                "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
                1403793930987,
                (DataPoint("ztp.request", "Z1.abc"),),
            ),
            id="flat-data",
        ),
        pytest.param(
            _NESTED,
            IncomingCommunication(
                "c8d3e4f2a1b04e7d9f2e3a4b5c6d7e8f",
                "LL542500111003",
                "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
                1403793930987,
                (
                    DataPoint("ztp.request", "Z1.abc", 14037939309874),
                    DataPoint("ztp.status", "{}", 14037939309874),
                ),
            ),
            id="nested-data-string-date",
        ),
        pytest.param(
            {
                "name": "event.system.incoming.communication",
                "date": 1.0,
                "content": {"system.id": "s", "communication.id": "c"},
            },
            IncomingCommunication("s", "c", None, 1, ()),
            id="no-message-id-no-data-float-date",
        ),
        pytest.param(
            _STATE_CHANGE,
            OperationStateChange("op1", "FINISHED", {"SUCCESS": 1, "FAILURE": 0}, 1403793930987),
            id="operation-state-change",
        ),
        pytest.param(
            {
                "name": "event.operation.state.change",
                "content": {
                    "operation.uid": "op1",
                    "operation.state.new": "IN_PROGRESS",
                    "operation.counters": {"SUCCESS": "0"},
                },
            },
            OperationStateChange("op1", "IN_PROGRESS", {"SUCCESS": 0}),
            id="state-change-counters-as-object",
        ),
        pytest.param(
            {
                "name": "event.operation.state.change",
                "content": {"operation.uid": "op1", "operation.state.new": "SCHEDULED"},
            },
            OperationStateChange("op1", "SCHEDULED"),
            id="state-change-no-counters",
        ),
        pytest.param(
            {"name": "event.system.alert", "date": 5, "content": {"anything": [1, {"x": None}]}},
            OtherEvent("event.system.alert", 5),
            id="alert",
        ),
        pytest.param(
            {"name": "event.usage", "date": "yesterday"},
            OtherEvent("event.usage", None),
            id="usage-unreadable-date",
        ),
        pytest.param({"name": "never.seen.before"}, OtherEvent("never.seen.before"), id="unknown"),
    ],
)
def test_parse_envelope(record: dict[str, object], expected: Event) -> None:
    assert parse_envelope(json.dumps(record).encode()) == expected


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(b"not json", "payload", id="malformed-json"),
        pytest.param(b"[]", "record", id="array-record"),
        pytest.param(b'"x"', "record", id="string-record"),
        pytest.param(b"{}", "name", id="missing-name"),
        pytest.param(b'{"name": 5}', "name", id="name-not-string"),
        pytest.param(b'{"name": ""}', "name", id="empty-name"),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1}',
            "content",
            id="missing-content",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content": []}',
            "content",
            id="content-not-object",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "content":'
            b' {"system.id": "s", "communication.id": "c"}}',
            "date",
            id="missing-date",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": true, "content":'
            b' {"system.id": "s", "communication.id": "c"}}',
            "date",
            id="bool-date",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content":'
            b' {"communication.id": "c"}}',
            "content.system.id",
            id="missing-system-id",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content":'
            b' {"system.id": 7, "communication.id": "c"}}',
            "content.system.id",
            id="system-id-not-string",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content":'
            b' {"system.id": "s"}}',
            "content.communication.id",
            id="missing-communication-id",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content":'
            b' {"system.id": "s", "communication.id": "c", "message.id": 3}}',
            "content.message.id",
            id="message-id-not-string",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content":'
            b' {"system.id": "s", "communication.id": "c", "ztp.request": null}}',
            "content.ztp.request",
            id="null-data-value",
        ),
        pytest.param(
            b'{"name": "event.system.incoming.communication", "date": 1, "content":'
            b' {"system.id": "s", "communication.id": "c", "when": {"ztp.request": "x"}}}',
            "content.when",
            id="nested-under-non-timestamp",
        ),
        pytest.param(
            b'{"name": "event.operation.state.change", "content": {"operation.state.new": "X"}}',
            "content.operation.uid",
            id="missing-operation-uid",
        ),
        pytest.param(
            b'{"name": "event.operation.state.change", "content": {"operation.uid": "o"}}',
            "content.operation.state.new",
            id="missing-new-state",
        ),
        pytest.param(
            b'{"name": "event.operation.state.change", "content": {"operation.uid": "o",'
            b' "operation.state.new": "X", "operation.counters": "lots"}}',
            "content.operation.counters",
            id="counters-not-list",
        ),
        pytest.param(
            b'{"name": "event.operation.state.change", "content": {"operation.uid": "o",'
            b' "operation.state.new": "X", "operation.counters": [{"state": "SUCCESS"}]}}',
            "content.operation.counters[0].count",
            id="counter-without-count",
        ),
        pytest.param(
            b'{"name": "event.operation.state.change", "content": {"operation.uid": "o",'
            b' "operation.state.new": "X", "operation.counters": [{"state": "S", "count": -1}]}}',
            "content.operation.counters[0].count",
            id="negative-count",
        ),
    ],
)
def test_parse_envelope_refuses_bad_input(data: bytes, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        parse_envelope(data)
    assert caught.value.field == field


def test_parse_envelope_refuses_oversized_record() -> None:
    content = {**_FLAT_CONTENT, "pad": "x" * 70_000}
    record = json.dumps({**_FLAT, "content": content})
    with pytest.raises(LimitExceededError):
        parse_envelope(record.encode())
    # ... and a larger bound accepts it.
    event = parse_envelope(record.encode(), max_bytes=128 * 1024)
    assert isinstance(event, IncomingCommunication)


@pytest.mark.parametrize(
    "event",
    [
        IncomingCommunication(
            "sys",
            "LL542500111003",
            "m1",
            1403793930987,
            (
                DataPoint("ztp.status", "{}"),
                DataPoint("ztp.request", "Z1.a", 1403793930000),
                DataPoint("ztp.request", "Z1.b", 1403793930001),
                DataPoint("ztp.other", 3, 1403793930000),
            ),
        ),
        IncomingCommunication("sys", "LL1", None, 0, ()),
        OperationStateChange("op", "FINISHED", {"SUCCESS": 2, "FAILURE": 1}, 7),
        OperationStateChange("op", "SCHEDULED"),
        OtherEvent("event.system.alert", 9),
        OtherEvent("event.usage"),
    ],
)
def test_envelope_round_trip(event: Event) -> None:
    back = parse_envelope(encode_envelope(event))
    if isinstance(event, IncomingCommunication):
        assert isinstance(back, IncomingCommunication)
        # Plain points come first, then timestamp groups in order of first appearance.
        plain = tuple(p for p in event.points if p.timestamp_ms is None)
        stamped = tuple(p for p in event.points if p.timestamp_ms is not None)
        order = list(dict.fromkeys(p.timestamp_ms for p in stamped))
        expected = plain + tuple(sorted(stamped, key=lambda p: order.index(p.timestamp_ms)))
        assert back.points == expected
        assert (back.system_uid, back.serial, back.message_id, back.date_ms) == (
            event.system_uid,
            event.serial,
            event.message_id,
            event.date_ms,
        )
    else:
        assert back == event


def test_encode_envelope_nests_timestamped_points() -> None:
    event = IncomingCommunication(
        "sys", "LL1", "m", 5, (DataPoint("a.b", 1), DataPoint("a.c", 2, 14037939309874))
    )
    assert json.loads(encode_envelope(event)) == {
        "name": "event.system.incoming.communication",
        "date": 5,
        "content": {
            "system.id": "sys",
            "communication.id": "LL1",
            "message.id": "m",
            "a.b": 1,
            "14037939309874": {"a.c": 2},
        },
    }


@pytest.mark.parametrize(
    "points",
    [
        (DataPoint("system.id", "x"),),
        (DataPoint("a.b", 1), DataPoint("a.b", 2)),
        (DataPoint("a.b", 1, 5), DataPoint("a.b", 2, 5)),
    ],
)
def test_encode_envelope_refuses_points_it_cannot_carry(points: tuple[DataPoint, ...]) -> None:
    with pytest.raises(InvalidValueError):
        encode_envelope(IncomingCommunication("s", "c", None, 1, points))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        ["name", "date", "content", "system.id", "communication.id", "a.b", "1"]
                    ),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_parse_envelope_never_raises_anything_untyped(data: bytes) -> None:
    with contextlib.suppress(WireFormatError, LimitExceededError):
        parse_envelope(data)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(
        [
            "event.system.incoming.communication",
            "event.operation.state.change",
            "event.alert",
        ]
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "system.id",
                "communication.id",
                "message.id",
                "operation.uid",
                "operation.state.new",
                "operation.counters",
                "a.b",
                "1403793930987",
            ]
        ),
        st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2),
        max_size=6,
    ),
)
def test_parse_envelope_fuzzed_known_names(name: str, content: dict[str, object]) -> None:
    data = json.dumps({"name": name, "date": 1, "content": content}).encode()
    with contextlib.suppress(WireFormatError):
        parse_envelope(data)
