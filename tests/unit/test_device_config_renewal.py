"""The device configuration's ``[renewal]`` section: defaults, file, environment, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from ztp_daemon.config import RenewalSection, environment_help, load_device_config
from ztp_daemon.machine import RenewalPolicy

BASE_ENV = {"ZTP_AIRVANTAGE_PASSWORD": "pw-renewal-test"}


def test_renewal_is_on_at_two_thirds_with_five_percent_jitter_by_default() -> None:
    config = load_device_config(None, BASE_ENV)
    assert config.renewal == RenewalSection(enabled=True, at_fraction=2 / 3, jitter_fraction=0.05)
    assert config.renewal.policy() == RenewalPolicy(at_fraction=2 / 3, jitter_fraction=0.05)


def test_renewal_from_the_file_and_overridden_by_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "ztp.toml"
    path.write_text("[renewal]\nenabled = true\nat_fraction = 0.5\njitter_fraction = 0.1\n")
    config = load_device_config(path, BASE_ENV)
    assert config.renewal.policy() == RenewalPolicy(at_fraction=0.5, jitter_fraction=0.1)
    overridden = load_device_config(
        path, BASE_ENV | {"ZTP_RENEWAL_ENABLED": "false", "ZTP_RENEWAL_AT_FRACTION": "0.75"}
    )
    assert overridden.renewal.at_fraction == 0.75
    assert overridden.renewal.jitter_fraction == 0.1
    assert overridden.renewal.policy() is None  # automatic renewal off


@pytest.mark.parametrize(
    ("env", "key", "words"),
    [
        ({"ZTP_RENEWAL_AT_FRACTION": "0"}, "renewal.at_fraction", "between 0 and 1"),
        ({"ZTP_RENEWAL_AT_FRACTION": "1"}, "renewal.at_fraction", "between 0 and 1"),
        ({"ZTP_RENEWAL_AT_FRACTION": "1.5"}, "ZTP_RENEWAL_AT_FRACTION", ""),
        ({"ZTP_RENEWAL_AT_FRACTION": "soon"}, "ZTP_RENEWAL_AT_FRACTION", ""),
        ({"ZTP_RENEWAL_JITTER_FRACTION": "-0.1"}, "ZTP_RENEWAL_JITTER_FRACTION", ""),
        (
            {"ZTP_RENEWAL_AT_FRACTION": "0.9", "ZTP_RENEWAL_JITTER_FRACTION": "0.2"},
            "renewal.jitter_fraction",
            "inside the lifetime",
        ),
        ({"ZTP_RENEWAL_ENABLED": "maybe"}, "ZTP_RENEWAL_ENABLED", ""),
    ],
)
def test_bad_renewal_settings_are_refused_by_key(env: dict[str, str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_device_config(None, BASE_ENV | env)
    message = str(caught.value)
    assert key in message
    assert words in message
    assert "pw-renewal-test" not in message


def test_unknown_renewal_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ztp.toml"
    path.write_text("[renewal]\nevery = 30\n")
    with pytest.raises(ConfigError, match=r"renewal\.every"):
        load_device_config(path, BASE_ENV)


def test_help_lists_the_renewal_variables() -> None:
    text = environment_help()
    for name in ("ZTP_RENEWAL_ENABLED", "ZTP_RENEWAL_AT_FRACTION", "ZTP_RENEWAL_JITTER_FRACTION"):
        assert name in text
