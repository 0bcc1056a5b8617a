"""The device daemon's one TLS client policy: verify the server, TLS 1.2 or later."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from sandbox.pki import SandboxPki
from ztp_daemon.tls import server_verifying_context


@pytest.mark.parametrize("use_ca_file", [True, False])
def test_the_context_verifies_the_server_and_refuses_old_tls(
    tmp_path: Path, use_ca_file: bool
) -> None:
    ca_file = SandboxPki.load_or_create(tmp_path / "pki").ca_file if use_ca_file else None
    context = server_verifying_context(ca_file)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        assert len(context.get_ca_certs()) == 1


def test_a_missing_ca_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        server_verifying_context(tmp_path / "absent.pem")


def test_a_file_without_a_certificate_is_an_ssl_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError):
        server_verifying_context(junk)
