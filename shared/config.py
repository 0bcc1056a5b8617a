"""A small, typed configuration loader: a TOML file, then environment overrides, then checks.

Each daemon declares its configuration as a frozen dataclass (the *schema*); nested sections are
nested frozen dataclasses. :func:`load_config` builds an instance from a TOML file and the
environment, converting and checking every value at start-up, so a bad setting stops the daemon
before it does anything, with a :class:`~shared.errors.ConfigError` naming the key.

Supported field types: ``str``, ``int``, ``float``, ``bool``, :class:`~pathlib.Path`, any
:class:`~enum.Enum`, ``tuple[X, ...]`` of those scalars, :class:`Secret`, and ``X | None`` of
any of them. Defaults come from the dataclass; a field without one is required.

Where a value comes from, highest precedence first:

1. the environment: ``{PREFIX}_{SECTION}_{FIELD}``, upper-case, nested sections joined by ``_``
   (``ZTP_AIRVANTAGE_PASSWORD`` for field ``password`` of section ``airvantage`` with prefix
   ``ZTP``);
2. the TOML file: ``[airvantage]`` / ``password = "..."``;
3. the dataclass default.

Secrets: a :class:`Secret` field can instead be read from a file, named by ``password_file`` in
TOML or ``ZTP_AIRVANTAGE_PASSWORD_FILE`` in the environment (systemd ``LoadCredential=``, ECS
secrets mounted as files). One trailing newline is stripped. Giving both the value and the file
in the same source is an error; the environment as a whole still wins over the TOML file.

Environment values are text: ``bool`` accepts true/false, yes/no, on/off, 1/0 (any case);
``tuple[...]`` is comma-separated (items stripped, an empty value is the empty tuple); an enum
is matched on its value, then on its member name (any case); for an ``X | None`` field an empty
value means ``None`` (TOML has no null: leave the key out instead).

Unknown keys are errors, never ignored: a key in the TOML file the schema does not declare, and
an environment variable starting with ``{PREFIX}_`` that names no field (pass the names the entry
point itself reads, such as ``ZTP_CONFIG``, in ``ignore_env``). A typo must not silently leave a
default in force.

Bounds: ``field(metadata={"min": 1, "max": 1200})`` bounds a number;
``{"min_length": 1, "max_length": 255}`` bounds the length of a string, a :class:`Secret` or a
tuple. Checks across fields belong in the schema's ``__post_init__``, which should raise
``ConfigError(key, reason)``; a ``ValueError`` it raises is reported against its section.

Error messages describe what was given (its type, and a short excerpt of non-secret values),
never the value of a :class:`Secret`.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import math
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from shared.errors import ConfigError, UsageError

__all__ = ["Secret", "env_names", "environment_help", "load_config", "read_toml"]

T = TypeVar("T")

_MASK: Final = "[redacted]"
_FILE_SUFFIX: Final = "_file"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_SCALARS: Final = (str, int, float, bool, Path)
_EXCERPT: Final = 40


@typing.final
class Secret:
    """A string that does not show itself: ``repr``, ``str`` and formatting print a mask.

    Args:
        value: the secret text.

    Use :meth:`reveal` at the one place that must send it (an HTTP form, an MQTT password).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise UsageError(f"Secret wraps a str, got {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """Return the secret text."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, format_spec: str) -> str:
        return format(_MASK, format_spec)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # Constant time: equality of secrets is sometimes an authentication check.
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        # Immutable, so sharing is copying; this also keeps dataclasses.asdict() working.
        return self

    def __reduce__(self) -> typing.NoReturn:
        # Pickling would write the secret in clear wherever the pickle goes.
        raise TypeError("a Secret cannot be pickled")


@dataclasses.dataclass(frozen=True, slots=True)
class _Leaf:
    """One field of the schema, resolved: where it lives and what it accepts."""

    key: str  # dotted: airvantage.password
    name: str  # the field name inside its section
    env: str  # ZTP_AIRVANTAGE_PASSWORD
    tp: Any  # the type without ``| None``
    optional: bool
    required: bool
    metadata: Mapping[str, Any]

    @property
    def secret(self) -> bool:
        return self.tp is Secret


@dataclasses.dataclass(frozen=True, slots=True)
class _Section:
    key: str  # dotted path of the section; "" for the root
    schema: type[Any]
    leaves: tuple[_Leaf, ...]
    # (field name, section, a maker of the field's default instance or None when required)
    sections: tuple[tuple[str, _Section, Callable[[], Any] | None], ...]


_TYPE_NAMES: Final[Mapping[Any, str]] = {
    Secret: "a secret string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path",
}


def _type_name(tp: Any) -> str:
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return repr(tp)


def _describe(value: object, *, secret: bool) -> str:
    """What was given, for an error message: its type, and an excerpt unless it is secret."""
    kind = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "table",
    }.get(type(value), type(value).__name__)
    if secret:
        length = f" of length {len(value)}" if isinstance(value, str | list) else ""
        return f"{kind}{length}"
    text = repr(value)
    if len(text) > _EXCERPT:
        text = f"{text[: _EXCERPT - 3]}..."
    return f"{kind} {text}"


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _check_supported(tp: Any, key: str) -> None:
    if tp in _SCALARS or tp is Secret:
        return
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if (
            len(args) == 2
            and args[1] is Ellipsis
            and (
                args[0] in _SCALARS
                or (isinstance(args[0], type) and issubclass(args[0], enum.Enum))
            )
        ):
            return
    raise UsageError(f"configuration field {key!r}: unsupported type {tp!r}")


def _default_maker(fld: dataclasses.Field[Any]) -> Callable[[], Any] | None:
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory
    if fld.default is not dataclasses.MISSING:
        default = fld.default
        return lambda: default
    return None


def _build_section(schema: type[Any], *, key: str, env: str, seen_env: dict[str, str]) -> _Section:
    if not dataclasses.is_dataclass(schema) or not isinstance(schema, type):
        raise UsageError(f"configuration schema {schema!r} is not a dataclass type")
    if not schema.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise UsageError(f"configuration schema {schema.__name__} must be a frozen dataclass")
    hints = typing.get_type_hints(schema)
    leaves: list[_Leaf] = []
    sections: list[tuple[str, _Section, Callable[[], Any] | None]] = []
    for fld in dataclasses.fields(schema):
        if not fld.init:
            continue
        dotted = f"{key}.{fld.name}" if key else fld.name
        env_name = f"{env}_{fld.name.upper()}"
        tp, optional = _split_optional(hints[fld.name])
        has_default = (
            fld.default is not dataclasses.MISSING or fld.default_factory is not dataclasses.MISSING
        )
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if optional:
                raise UsageError(f"configuration section {dotted!r} cannot be optional")
            sub = _build_section(tp, key=dotted, env=env_name, seen_env=seen_env)
            sections.append((fld.name, sub, _default_maker(fld)))
            continue
        _check_supported(tp, dotted)
        names = [env_name, f"{env_name}_FILE"] if tp is Secret else [env_name]
        for name in names:
            if name in seen_env:
                raise UsageError(
                    f"configuration fields {seen_env[name]!r} and {dotted!r} "
                    f"share the environment variable {name}"
                )
            seen_env[name] = dotted
        leaves.append(
            _Leaf(
                key=dotted,
                name=fld.name,
                env=env_name,
                tp=tp,
                optional=optional,
                required=not has_default,
                metadata=fld.metadata,
            )
        )
    return _Section(key=key, schema=schema, leaves=tuple(leaves), sections=tuple(sections))


def _convert_env(leaf: _Leaf, text: str, source: str) -> object:
    """Convert environment text to the leaf's type; ``source`` names the variable."""
    if leaf.optional and text == "":
        return None
    tp = leaf.tp
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        items = [] if not text.strip() else [part.strip() for part in text.split(",")]
        return tuple(_convert_env_scalar(item_tp, item, source, secret=False) for item in items)
    return _convert_env_scalar(tp, text, source, secret=leaf.secret)


def _parse_path(text: str) -> Path:
    if not text:
        raise ValueError(text)
    return Path(text)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in _TRUE | _FALSE:
        raise ValueError(text)
    return lowered in _TRUE


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


def _parse_enum(tp: type[enum.Enum], text: str) -> enum.Enum:
    for member in tp:
        if str(member.value) == text:
            return member
    for member in tp:
        if member.name.lower() == text.strip().lower():
            return member
    raise ValueError(text)


_ENV_PARSERS: Final[Mapping[Any, typing.Callable[[str], object]]] = {
    str: str,
    Secret: Secret,
    Path: _parse_path,
    bool: _parse_bool,
    int: lambda text: int(text, 10),
    float: _parse_float,
}


def _convert_env_scalar(tp: Any, text: str, source: str, *, secret: bool) -> object:
    parser = _ENV_PARSERS.get(tp)
    try:
        return parser(text) if parser is not None else _parse_enum(tp, text)
    except ValueError:
        raise ConfigError(
            source, f"expected {_type_name(tp)}, got {_describe(text, secret=secret)}"
        ) from None


def _convert_toml(leaf: _Leaf, value: object) -> object:
    tp = leaf.tp
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(
                leaf.key, f"expected {_type_name(tp)}, got {_describe(value, secret=False)}"
            )
        return tuple(
            _convert_toml_scalar(item_tp, item, f"{leaf.key}[{i}]", secret=False)
            for i, item in enumerate(value)
        )
    return _convert_toml_scalar(tp, value, leaf.key, secret=leaf.secret)


def _convert_toml_scalar(tp: Any, value: object, key: str, *, secret: bool) -> object:
    def fail() -> ConfigError:
        return ConfigError(key, f"expected {_type_name(tp)}, got {_describe(value, secret=secret)}")

    result: object = None
    if tp in (str, Secret, Path):
        if not isinstance(value, str) or (tp is Path and not value):
            raise fail()
        result = Secret(value) if tp is Secret else tp(value)
    elif tp is bool:
        if not isinstance(value, bool):
            raise fail()
        result = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        result = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail()
        if not math.isfinite(value):
            raise fail()
        result = float(value)
    else:
        result = next((m for m in tp if m.value == value), None)
        if result is None and isinstance(value, str):
            result = next((m for m in tp if m.name.lower() == value.lower()), None)
        if result is None:
            raise fail()
    return result


def _read_secret_file(path_text: str, source: str) -> Secret:
    if not path_text:
        raise ConfigError(source, "secret file path is empty")
    try:
        # Bytes, not text mode: universal newlines would rewrite a "\r" inside the secret.
        text = Path(path_text).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            source, f"cannot read secret file {path_text}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(source, f"secret file {path_text} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return Secret(text)


def _check_bounds(leaf: _Leaf, value: object, source: str) -> None:
    meta = leaf.metadata
    if value is None:
        return
    low, high = meta.get("min"), meta.get("max")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if low is not None and value < low:
            raise ConfigError(source, f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ConfigError(source, f"must be <= {high}, got {value}")
    min_len, max_len = meta.get("min_length"), meta.get("max_length")
    if isinstance(value, str | Secret | tuple):
        size = len(value)
        unit = "items" if isinstance(value, tuple) else "characters"
        if min_len is not None and size < min_len:
            raise ConfigError(source, f"must have at least {min_len} {unit}, got {size}")
        if max_len is not None and size > max_len:
            raise ConfigError(source, f"must have at most {max_len} {unit}, got {size}")


def _resolve_leaf(
    leaf: _Leaf, table: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[object, bool]:
    """Return (value, found) for one field, env first, then TOML."""
    file_env = f"{leaf.env}{_FILE_SUFFIX.upper()}"
    file_key = f"{leaf.name}{_FILE_SUFFIX}"
    if leaf.secret and leaf.env in env and file_env in env:
        raise ConfigError(leaf.env, f"both {leaf.env} and {file_env} are set; choose one")
    if leaf.env in env:
        value = _convert_env(leaf, env[leaf.env], leaf.env)
        _check_bounds(leaf, value, leaf.env)
        return value, True
    if leaf.secret and file_env in env:
        value = _read_secret_file(env[file_env], file_env)
        _check_bounds(leaf, value, file_env)
        return value, True
    if leaf.secret and leaf.name in table and file_key in table:
        raise ConfigError(leaf.key, f"both {leaf.name!r} and {file_key!r} are set; choose one")
    if leaf.name in table:
        value = _convert_toml(leaf, table[leaf.name])
        _check_bounds(leaf, value, leaf.key)
        return value, True
    if leaf.secret and file_key in table:
        dotted_file = f"{leaf.key}{_FILE_SUFFIX}"
        path_text = table[file_key]
        if not isinstance(path_text, str):
            raise ConfigError(
                dotted_file, f"expected a path, got {_describe(path_text, secret=False)}"
            )
        value = _read_secret_file(path_text, dotted_file)
        _check_bounds(leaf, value, dotted_file)
        return value, True
    return None, False


def _check_keys(section: _Section, table: Mapping[str, Any]) -> None:
    """Refuse unknown keys and non-table sections everywhere, before any value is read.

    Done first so a misspelt key is reported as unknown rather than as a missing required one.
    """
    known = {leaf.name for leaf in section.leaves}
    known |= {f"{leaf.name}{_FILE_SUFFIX}" for leaf in section.leaves if leaf.secret}
    known |= {name for name, _, _ in section.sections}
    for name in table:
        if name not in known:
            raise ConfigError(f"{section.key}.{name}" if section.key else name, "unknown key")
    for name, sub, _ in section.sections:
        sub_table = table.get(name, {})
        if not isinstance(sub_table, dict):
            raise ConfigError(
                sub.key, f"expected a table, got {_describe(sub_table, secret=False)}"
            )
        _check_keys(sub, sub_table)


def _load_section(
    section: _Section, table: Mapping[str, Any], env: Mapping[str, str], base: Any | None
) -> Any:
    """Build one section; ``base`` is the section's default instance, when its parent has one.

    A value neither file nor environment sets comes from ``base`` (so a parent's
    ``default_factory`` that changes some fields keeps them when others are overridden), else
    from the dataclass default; without either the key is required.
    """
    kwargs: dict[str, Any] = {}
    for leaf in section.leaves:
        value, found = _resolve_leaf(leaf, table, env)
        if found:
            kwargs[leaf.name] = value
        elif base is not None:
            kwargs[leaf.name] = getattr(base, leaf.name)
        elif leaf.required:
            hint = f" (or {leaf.name}_file / {leaf.env}_FILE)" if leaf.secret else ""
            raise ConfigError(leaf.key, f"required: set it in the file or in {leaf.env}{hint}")
    for name, sub, default in section.sections:
        if base is not None:
            sub_base = getattr(base, name)
        else:
            sub_base = default() if default is not None else None
        kwargs[name] = _load_section(sub, table.get(name, {}), env, sub_base)
    try:
        return section.schema(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(section.key or section.schema.__name__, str(exc)) from None


def _normalise_prefix(env_prefix: str) -> str:
    prefix = env_prefix.rstrip("_").upper()
    if not prefix:
        raise UsageError("env_prefix must not be empty")
    return prefix


def env_names(schema: type[Any], *, env_prefix: str) -> dict[str, str]:
    """Map every environment variable the schema reads to its dotted key.

    Args:
        schema: the frozen dataclass type.
        env_prefix: the prefix (``ZTP``); a trailing ``_`` is optional.

    Returns:
        ``{"ZTP_AIRVANTAGE_PASSWORD": "airvantage.password",
        "ZTP_AIRVANTAGE_PASSWORD_FILE": "airvantage.password", ...}``, for ``--help`` text and
        deployment templates.

    Raises:
        UsageError: the schema is not a frozen dataclass, uses an unsupported type, or two
            fields share an environment variable name.
    """
    seen: dict[str, str] = {}
    _build_section(schema, key="", env=_normalise_prefix(env_prefix), seen_env=seen)
    return seen


def environment_help(schema: type[Any], *, env_prefix: str, config_env: str) -> str:
    """The environment variables a schema reads, one per line with the key each sets.

    Args:
        schema: the frozen dataclass type.
        env_prefix: the prefix (``ZTP``, ``ZTP_CLOUD``).
        config_env: the variable the entry point reads for the TOML file, listed last.

    Returns:
        Indented, aligned lines for an ``argparse`` epilog.

    Raises:
        UsageError: as :func:`env_names`.
    """
    names = env_names(schema, env_prefix=env_prefix)
    width = max(len(name) for name in [*names, config_env])
    lines = [f"  {name:<{width}}  {key}" for name, key in sorted(names.items())]
    lines.append(f"  {config_env:<{width}}  the TOML file (instead of --config)")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, translating every way it can fail into a :class:`ConfigError`.

    Args:
        path: the file.

    Returns:
        The parsed document.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, or is not valid TOML; ``key`` is
            the path.
    """
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not UTF-8 text") from None


def load_config(
    schema: type[T],
    *,
    path: Path | None,
    env: Mapping[str, str],
    env_prefix: str,
    ignore_env: Collection[str] = (),
) -> T:
    """Build a configuration object from a TOML file and environment overrides.

    Args:
        schema: the frozen dataclass type describing the configuration.
        path: the TOML file, or ``None`` to use the environment and defaults only.
        env: the environment (``os.environ``, or a dict in tests).
        env_prefix: the prefix of the variables (``ZTP``, ``ZTP_CLOUD``); a trailing ``_`` is
            optional.
        ignore_env: variables with the prefix that are not configuration keys (``ZTP_CONFIG``,
            read by the entry point itself).

    Returns:
        An instance of ``schema``.

    Raises:
        ConfigError: the file cannot be read or parsed, a key is unknown, missing, of the wrong
            type or out of bounds, or a secret file cannot be read. ``key`` names the dotted key,
            or the environment variable when the bad value came from there.
        UsageError: the schema itself is unusable (not a frozen dataclass, unsupported type,
            two fields mapping to one environment variable, empty prefix).
    """
    prefix = _normalise_prefix(env_prefix)
    known_env: dict[str, str] = {}
    root = _build_section(schema, key="", env=prefix, seen_env=known_env)
    ignored = set(ignore_env)
    for name in sorted(env):
        if name.startswith(f"{prefix}_") and name not in known_env and name not in ignored:
            raise ConfigError(name, "unknown environment variable (no configuration key uses it)")
    table = {} if path is None else read_toml(path)
    _check_keys(root, table)
    result: T = _load_section(root, table, env, None)
    return result
