"""The device daemon's TLS policy, once for both brokers it talks to (AirVantage and AWS IoT).

A client context verifies the server's certificate and host name, against a configured CA file
or the system trust store, and refuses anything older than TLS 1.2 (AWS IoT Core and AirVantage
both require 1.2 or later; an older version offered would only open a downgrade).
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["server_verifying_context"]


def server_verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the server, TLS 1.2 or later (blocking: reads the CA file).

    Args:
        ca_file: the CA to trust, or ``None`` for the system trust store.

    Returns:
        The context, ready for a client certificate to be added (mutual TLS) or used as is.

    Raises:
        OSError: the CA file cannot be read.
        ssl.SSLError: the CA file holds no usable certificate.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file is not None else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
