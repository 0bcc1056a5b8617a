"""The MQTT wire primitives against paho's own encoders and the specification's boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.properties import VariableByteIntegers, writeUTF

from ztp_daemon.mqtt_wire import utf8_string, variable_byte_integer

_MAX_VBI = 268_435_455


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (_MAX_VBI, b"\xff\xff\xff\x7f"),
    ],
)
def test_variable_byte_integer_boundaries_of_the_specification(value: int, encoded: bytes) -> None:
    assert variable_byte_integer(value) == encoded


@given(st.integers(min_value=0, max_value=_MAX_VBI))
def test_variable_byte_integer_matches_paho(value: int) -> None:
    assert variable_byte_integer(value) == VariableByteIntegers.encode(value)


@given(st.text(max_size=300))
def test_utf8_string_matches_paho(text: str) -> None:
    assert utf8_string(text) == bytes(writeUTF(text))


def test_utf8_string_counts_bytes_not_characters() -> None:
    assert utf8_string("é€") == b"\x00\x05" + "é€".encode()


def test_utf8_string_refuses_what_two_bytes_cannot_count() -> None:
    with pytest.raises(OverflowError):
        utf8_string("x" * 65_536)
