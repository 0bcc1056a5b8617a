"""MQTT wire primitives the project packs itself (pure: bytes out, no I/O).

The publisher packs a PUBLISH's user property by hand (paho's general properties cost too much
per message), and the sandbox's broker probe writes a bare CONNECT packet; both need the two
encodings MQTT builds everything from (MQTT 5.0 sections 1.5.4 and 1.5.5; 3.1.1 is the same).
"""

from __future__ import annotations

__all__ = ["utf8_string", "variable_byte_integer"]


def utf8_string(text: str) -> bytes:
    """Encode a UTF-8 string field: a two-byte big-endian length, then the bytes.

    Args:
        text: the string (at most 65,535 bytes once encoded).

    Returns:
        The field as sent on the wire.

    Raises:
        OverflowError: the encoded string is longer than 65,535 bytes.
    """
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def variable_byte_integer(value: int) -> bytes:
    """Encode a variable byte integer (the packet's remaining length, a properties length).

    Args:
        value: a non-negative integer (MQTT allows up to 268,435,455: four bytes).

    Returns:
        Seven bits per byte, least significant first, the top bit set on all but the last.
    """
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)
