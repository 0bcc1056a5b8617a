"""The configuration loader: TOML, environment overrides, secrets from files, errors by key."""

from __future__ import annotations

import copy
import dataclasses
import enum
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.config import Secret, env_names, environment_help, load_config, read_toml
from shared.errors import ConfigError, UsageError


class Region(enum.Enum):
    EU = "eu"
    NA = "na"


@dataclass(frozen=True, slots=True)
class AirVantage:
    username: str
    password: Secret = field(metadata={"min_length": 1, "max_length": 255})
    host: str = "eu.airvantage.net"
    region: Region = Region.EU
    client_secret: Secret | None = None
    timeout: float = field(default=10.0, metadata={"min": 0.1, "max": 300})
    port: int = field(default=8883, metadata={"min": 1, "max": 65535})


@dataclass(frozen=True, slots=True)
class Paths:
    state_dir: Path = Path("/var/lib/ztp")
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Schema:
    airvantage: AirVantage
    paths: Paths = field(default_factory=Paths)
    topics: tuple[str, ...] = ("status",)
    verbose: bool = False
    retries: int | None = field(default=None, metadata={"min": 0})


MINIMAL = """
[airvantage]
username = "SN1"
password = "hunter2-file"
"""

SECRETS = ("hunter2-file", "hunter2-env", "hunter2-from-file", "cs-secret-777")


@pytest.fixture
def secret_files(tmp_path: Path) -> Path:
    (tmp_path / "password").write_text("hunter2-from-file\n")
    (tmp_path / "password_crlf").write_text("hunter2-from-file\r\n")
    (tmp_path / "password_two_newlines").write_text("hunter2-from-file\n\n")
    (tmp_path / "not_utf8").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "password_inner_cr").write_bytes(b"hunter2\rfrom-file\n")
    return tmp_path


def _load(toml: str | None, env: dict[str, str], tmp: Path, **kwargs: Any) -> Schema:
    path: Path | None = None
    if toml is not None:
        path = tmp / "ztp.toml"
        path.write_text(toml.replace("{tmp}", str(tmp)))
    env = {k: v.replace("{tmp}", str(tmp)) for k, v in env.items()}
    return load_config(Schema, path=path, env=env, env_prefix="ZTP", **kwargs)


GOOD: list[tuple[str, str | None, dict[str, str], Callable[[Schema], object]]] = [
    (
        "defaults from the dataclass",
        MINIMAL,
        {},
        lambda c: (
            (
                c.airvantage.host,
                c.airvantage.region,
                c.airvantage.client_secret,
                c.airvantage.timeout,
                c.paths,
                c.topics,
                c.verbose,
                c.retries,
            )
            == ("eu.airvantage.net", Region.EU, None, 10.0, Paths(), ("status",), False, None)
        ),
    ),
    (
        "env only, no file",
        None,
        {"ZTP_AIRVANTAGE_USERNAME": "SN9", "ZTP_AIRVANTAGE_PASSWORD": "hunter2-env"},
        lambda c: (c.airvantage.username, c.airvantage.password.reveal()) == ("SN9", "hunter2-env"),
    ),
    (
        "env wins over the file",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASSWORD": "hunter2-env", "ZTP_AIRVANTAGE_PORT": "443"},
        lambda c: (c.airvantage.password.reveal(), c.airvantage.port) == ("hunter2-env", 443),
    ),
    (
        "env secret file wins over the file value",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASSWORD_FILE": "{tmp}/password"},
        lambda c: c.airvantage.password.reveal() == "hunter2-from-file",
    ),
    (
        "env value wins over the file's secret file",
        '[airvantage]\nusername = "SN1"\npassword_file = "{tmp}/password"\n',
        {"ZTP_AIRVANTAGE_PASSWORD": "hunter2-env"},
        lambda c: c.airvantage.password.reveal() == "hunter2-env",
    ),
    (
        "secret file from the file, one newline stripped",
        '[airvantage]\nusername = "SN1"\npassword_file = "{tmp}/password"\n',
        {},
        lambda c: c.airvantage.password.reveal() == "hunter2-from-file",
    ),
    (
        "secret file with CRLF",
        '[airvantage]\nusername = "SN1"\npassword_file = "{tmp}/password_crlf"\n',
        {},
        lambda c: c.airvantage.password.reveal() == "hunter2-from-file",
    ),
    (
        "only one trailing newline is stripped",
        '[airvantage]\nusername = "SN1"\npassword_file = "{tmp}/password_two_newlines"\n',
        {},
        lambda c: c.airvantage.password.reveal() == "hunter2-from-file\n",
    ),
    (
        "a carriage return inside a secret file is kept",
        '[airvantage]\nusername = "SN1"\npassword_file = "{tmp}/password_inner_cr"\n',
        {},
        lambda c: c.airvantage.password.reveal() == "hunter2\rfrom-file",
    ),
    (
        "env conversions",
        MINIMAL,
        {
            "ZTP_VERBOSE": "Yes",
            "ZTP_TOPICS": " a, b ,c",
            "ZTP_AIRVANTAGE_REGION": "NA",
            "ZTP_AIRVANTAGE_TIMEOUT": "0.5",
            "ZTP_RETRIES": "0",
            "ZTP_PATHS_CA_FILE": "/etc/ca.pem",
        },
        lambda c: (
            (
                c.verbose,
                c.topics,
                c.airvantage.region,
                c.airvantage.timeout,
                c.retries,
                c.paths.ca_file,
                c.paths.state_dir,
            )
            == (True, ("a", "b", "c"), Region.NA, 0.5, 0, Path("/etc/ca.pem"), Path("/var/lib/ztp"))
        ),
    ),
    ("empty env tuple is empty", MINIMAL, {"ZTP_TOPICS": ""}, lambda c: c.topics == ()),
    (
        "empty env value clears an optional",
        MINIMAL + "[paths]\nca_file = '/etc/ca.pem'\n",
        {"ZTP_PATHS_CA_FILE": ""},
        lambda c: c.paths.ca_file is None,
    ),
    (
        "toml list and ints as floats",
        'topics = ["x", "y"]\nverbose = true\n' + MINIMAL + "timeout = 7\n",
        {},
        lambda c: (c.topics, c.verbose, c.airvantage.timeout) == (("x", "y"), True, 7.0),
    ),
    (
        "bounds inclusive",
        MINIMAL + "port = 65535\ntimeout = 0.1\n",
        {},
        lambda c: (c.airvantage.port, c.airvantage.timeout) == (65535, 0.1),
    ),
    (
        "ignored env names",
        MINIMAL,
        {"ZTP_CONFIG": "/etc/ztp.toml", "OTHER_VAR": "x", "ZTPX_Y": "z"},
        lambda c: c.airvantage.username == "SN1",
    ),
]


@pytest.mark.parametrize(
    ("toml", "env", "check"),
    [pytest.param(toml, env, check, id=name) for name, toml, env, check in GOOD],
)
def test_good_configurations(
    toml: str | None,
    env: dict[str, str],
    check: Callable[[Schema], object],
    secret_files: Path,
) -> None:
    config = _load(toml, env, secret_files, ignore_env={"ZTP_CONFIG"})
    assert check(config) is True


def test_every_type_from_the_file(secret_files: Path) -> None:
    toml = (
        MINIMAL
        + 'host = "na.airvantage.net"\nregion = "na"\nclient_secret = "cs-secret-777"\n'
        + 'timeout = 5\nport = 1883\n[paths]\nstate_dir = "/tmp/state"\n'
        + 'ca_file = "/etc/ztp/ca.pem"\n'
    )
    config = _load(toml, {}, secret_files)
    assert config == Schema(
        airvantage=AirVantage(
            username="SN1",
            password=Secret("hunter2-file"),
            host="na.airvantage.net",
            region=Region.NA,
            client_secret=Secret("cs-secret-777"),
            timeout=5.0,
            port=1883,
        ),
        paths=Paths(state_dir=Path("/tmp/state"), ca_file=Path("/etc/ztp/ca.pem")),
    )
    assert isinstance(config.airvantage.timeout, float)


# (case, TOML text or None, env, the ConfigError.key expected, a fragment of its reason)
BAD: list[tuple[str, str | None, dict[str, str], str, str]] = [
    ("missing required section", None, {}, "airvantage.username", "required"),
    (
        "missing required secret",
        '[airvantage]\nusername = "SN1"\n',
        {},
        "airvantage.password",
        "ZTP_AIRVANTAGE_PASSWORD_FILE",
    ),
    ("unknown top-level key", MINIMAL + "[loging]\nlevel = 1\n", {}, "loging", "unknown key"),
    ("unknown nested key", MINIMAL + "hots = 'x'\n", {}, "airvantage.hots", "unknown key"),
    (
        "a misspelt required key is reported as unknown",
        '[airvantage]\nusername = "SN1"\npasword = "hunter2-file"\n',
        {},
        "airvantage.pasword",
        "unknown key",
    ),
    (
        "_file on a non-secret field",
        MINIMAL + "host_file = '/x'\n",
        {},
        "airvantage.host_file",
        "unknown key",
    ),
    (
        "unknown env var",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASWORD": "hunter2-env"},
        "ZTP_AIRVANTAGE_PASWORD",
        "unknown environment variable",
    ),
    ("_FILE env on a non-secret", MINIMAL, {"ZTP_VERBOSE_FILE": "/x"}, "ZTP_VERBOSE_FILE", ""),
    ("wrong type in file: int", MINIMAL + "port = '8883'\n", {}, "airvantage.port", "integer"),
    ("bool is not an int", MINIMAL + "port = true\n", {}, "airvantage.port", "integer"),
    ("wrong type in file: bool", "verbose = 1\n" + MINIMAL, {}, "verbose", "boolean"),
    ("wrong type in file: float", MINIMAL + "timeout = 'x'\n", {}, "airvantage.timeout", "number"),
    ("nan float", MINIMAL + "timeout = nan\n", {}, "airvantage.timeout", "number"),
    ("wrong tuple item", "topics = ['a', 2]\n" + MINIMAL, {}, "topics[1]", "string"),
    ("tuple given a string", "topics = 'a'\n" + MINIMAL, {}, "topics", "list of"),
    ("bad enum", MINIMAL + "region = 'asia'\n", {}, "airvantage.region", "'eu', 'na'"),
    ("section given a scalar", "paths = 3\n" + MINIMAL, {}, "paths", "table"),
    ("empty path", MINIMAL + "[paths]\nstate_dir = ''\n", {}, "paths.state_dir", "path"),
    ("secret wrong type", MINIMAL.replace('"hunter2-file"', "12"), {}, "airvantage.password", ""),
    ("env bad int", MINIMAL, {"ZTP_AIRVANTAGE_PORT": "88x"}, "ZTP_AIRVANTAGE_PORT", "integer"),
    ("env bad bool", MINIMAL, {"ZTP_VERBOSE": "maybe"}, "ZTP_VERBOSE", "boolean"),
    ("env bad float", MINIMAL, {"ZTP_AIRVANTAGE_TIMEOUT": "inf"}, "ZTP_AIRVANTAGE_TIMEOUT", ""),
    ("env bad enum", MINIMAL, {"ZTP_AIRVANTAGE_REGION": "xx"}, "ZTP_AIRVANTAGE_REGION", "one of"),
    ("env empty non-optional", MINIMAL, {"ZTP_AIRVANTAGE_PORT": ""}, "ZTP_AIRVANTAGE_PORT", ""),
    ("below min", MINIMAL + "port = 0\n", {}, "airvantage.port", ">= 1"),
    ("above max", MINIMAL + "timeout = 301.0\n", {}, "airvantage.timeout", "<= 300"),
    ("env below min", MINIMAL, {"ZTP_RETRIES": "-1"}, "ZTP_RETRIES", ">= 0"),
    (
        "secret too long",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASSWORD": "hunter2-env" * 30},
        "ZTP_AIRVANTAGE_PASSWORD",
        "at most 255 characters, got 330",
    ),
    (
        "secret empty",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASSWORD": ""},
        "ZTP_AIRVANTAGE_PASSWORD",
        "at least 1",
    ),
    (
        "both value and file in TOML",
        MINIMAL + 'password_file = "{tmp}/password"\n',
        {},
        "airvantage.password",
        "choose one",
    ),
    (
        "both value and file in env",
        MINIMAL,
        {
            "ZTP_AIRVANTAGE_PASSWORD": "hunter2-env",
            "ZTP_AIRVANTAGE_PASSWORD_FILE": "{tmp}/password",
        },
        "ZTP_AIRVANTAGE_PASSWORD",
        "choose one",
    ),
    (
        "missing secret file (TOML)",
        '[airvantage]\nusername = "SN1"\npassword_file = "{tmp}/absent"\n',
        {},
        "airvantage.password_file",
        "cannot read secret file",
    ),
    (
        "unreadable secret file (a directory, env)",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASSWORD_FILE": "{tmp}"},
        "ZTP_AIRVANTAGE_PASSWORD_FILE",
        "cannot read secret file",
    ),
    (
        "secret file not UTF-8",
        MINIMAL,
        {"ZTP_AIRVANTAGE_PASSWORD_FILE": "{tmp}/not_utf8"},
        "ZTP_AIRVANTAGE_PASSWORD_FILE",
        "UTF-8",
    ),
    (
        "secret file path not a string",
        '[airvantage]\nusername = "SN1"\npassword_file = 3\n',
        {},
        "airvantage.password_file",
        "path",
    ),
]


@pytest.mark.parametrize(
    ("toml", "env", "key", "reason"),
    [pytest.param(toml, env, key, reason, id=name) for name, toml, env, key, reason in BAD],
)
def test_bad_configurations(
    toml: str | None, env: dict[str, str], key: str, reason: str, secret_files: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(toml, env, secret_files)
    assert caught.value.key == key
    assert reason in caught.value.reason
    for secret in SECRETS:
        assert secret not in str(caught.value)


def test_type_errors_describe_non_secret_values_but_not_secrets(secret_files: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(MINIMAL, {"ZTP_AIRVANTAGE_PORT": "eighty"}, secret_files)
    assert "'eighty'" in caught.value.reason
    with pytest.raises(ConfigError) as caught:
        _load(MINIMAL.replace('"hunter2-file"', "['hunter2-file']"), {}, secret_files)
    assert caught.value.reason == "expected a secret string, got list of length 1"


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(Schema, path=missing, env={}, env_prefix="ZTP")
    assert caught.value.key == str(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[airvantage]\npassword = hunter2-unquoted\n")
    with pytest.raises(ConfigError) as caught:
        load_config(Schema, path=broken, env={}, env_prefix="ZTP")
    assert caught.value.key == str(broken)
    assert "not valid TOML" in caught.value.reason
    assert "hunter2-unquoted" not in str(caught.value)


def test_prefix_may_end_with_underscore(secret_files: Path) -> None:
    config = load_config(
        Schema,
        path=None,
        env={
            "ztp_lower": "ignored: not upper-case",
            "ZTP_AIRVANTAGE_USERNAME": "SN3",
            "ZTP_AIRVANTAGE_PASSWORD": "hunter2-env",
        },
        env_prefix="ztp_",
    )
    assert config.airvantage.username == "SN3"


def test_env_names_lists_every_variable() -> None:
    names = env_names(Schema, env_prefix="ZTP")
    assert names["ZTP_AIRVANTAGE_PASSWORD"] == "airvantage.password"
    assert names["ZTP_AIRVANTAGE_PASSWORD_FILE"] == "airvantage.password"
    assert names["ZTP_AIRVANTAGE_CLIENT_SECRET_FILE"] == "airvantage.client_secret"
    assert names["ZTP_PATHS_CA_FILE"] == "paths.ca_file"
    assert "ZTP_PATHS_CA_FILE_FILE" not in names
    assert len(names) == 14


def test_environment_help_lists_every_variable_aligned_and_the_file_variable_last() -> None:
    lines = environment_help(Schema, env_prefix="ZTP", config_env="ZTP_CONFIG").splitlines()
    names = env_names(Schema, env_prefix="ZTP")
    assert [line.split()[0] for line in lines] == [*sorted(names), "ZTP_CONFIG"]
    assert [line.split()[1] for line in lines[:-1]] == [names[n] for n in sorted(names)]
    assert lines[-1].endswith("the TOML file (instead of --config)")
    # The keys start in one column, so the list reads as a table.
    assert len({line.find(line.split()[1], 2 + len(line.split()[0])) for line in lines}) == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"[a\n", "not valid TOML"), (b"x = '\xff'\n", "not UTF-8"), (None, "cannot read")],
)
def test_read_toml_names_the_file_whatever_fails(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "ztp.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        read_toml(path)
    assert caught.value.key == str(path)
    assert reason in caught.value.reason


# --- Secret ----------------------------------------------------------------------------------


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2-env")
    assert secret.reveal() == "hunter2-env"
    for text in (repr(secret), str(secret), f"{secret}", f"{secret:>20}", repr([secret])):
        assert "hunter2" not in text
        assert "[redacted]" in text
    assert secret == Secret("hunter2-env")
    assert secret != Secret("other")
    assert hash(secret) == hash(Secret("hunter2-env"))
    assert len(secret) == 11
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(UsageError):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_config_repr_masks_secrets(secret_files: Path) -> None:
    config = _load(MINIMAL, {"ZTP_AIRVANTAGE_CLIENT_SECRET": "cs-secret-777"}, secret_files)
    as_dict = dataclasses.asdict(config)
    assert as_dict["airvantage"]["password"].reveal() == "hunter2-file"
    assert copy.deepcopy(config) == config
    for text in (repr(config), str(as_dict)):
        assert "hunter2" not in text
        assert "cs-secret-777" not in text


# --- schema problems are our own bugs: UsageError --------------------------------------------


@dataclass
class NotFrozen:
    a: int = 1


@dataclass(frozen=True)
class Unsupported:
    a: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Inner:
    b: int = 1


@dataclass(frozen=True)
class Colliding:
    a: Inner = field(default_factory=Inner)
    a_b: int = 2


@dataclass(frozen=True)
class SecretFileCollision:
    token: Secret | None = None
    token_file: str = ""


@dataclass(frozen=True)
class OptionalSection:
    inner: Inner | None = None


@pytest.mark.parametrize(
    "schema", [NotFrozen, Unsupported, Colliding, SecretFileCollision, OptionalSection, int]
)
def test_bad_schemas_raise_usage_error(schema: type[Any]) -> None:
    with pytest.raises(UsageError) as caught:
        load_config(schema, path=None, env={}, env_prefix="ZTP")
    assert not isinstance(caught.value, ConfigError)


def test_empty_prefix_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        load_config(Inner, path=None, env={}, env_prefix="_")


# --- checks across fields --------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")


@dataclass(frozen=True)
class Checked:
    window: Window = field(default_factory=Window)
    name: str = "x"

    def __post_init__(self) -> None:
        if self.name == "bad":
            raise ConfigError("name", "must not be 'bad'")


def test_post_init_value_error_names_the_section() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Checked, path=None, env={"ZTP_WINDOW_LOW": "11"}, env_prefix="ZTP")
    assert caught.value.key == "window"
    assert caught.value.reason == "low must not exceed high"


def test_post_init_config_error_passes_through() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Checked, path=None, env={"ZTP_NAME": "bad"}, env_prefix="ZTP")
    assert caught.value.key == "name"


def test_defaulted_section_is_built_from_env_alone() -> None:
    config = load_config(Checked, path=None, env={"ZTP_WINDOW_HIGH": "20"}, env_prefix="ZTP")
    assert config.window == Window(low=0, high=20)


@dataclass(frozen=True)
class Tuned:
    window: Window = field(default_factory=lambda: Window(low=5, high=50))
    fixed: Window = Window(low=1, high=2)


def test_section_default_factory_values_survive_partial_overrides(tmp_path: Path) -> None:
    path = tmp_path / "tuned.toml"
    path.write_text("[fixed]\nhigh = 3\n")
    config = load_config(Tuned, path=path, env={"ZTP_WINDOW_HIGH": "60"}, env_prefix="ZTP")
    assert config == Tuned(window=Window(low=5, high=60), fixed=Window(low=1, high=3))
    assert load_config(Tuned, path=None, env={}, env_prefix="ZTP") == Tuned()
