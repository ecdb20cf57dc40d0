"""Typed-dataclass configuration machinery shared by every component.

House style: each component owns one kw-only ``@dataclass`` config next to its module
(``megatron_lcr/parallel/layout.py`` defines ``ParallelConfig`` and so on), documents every
field with an attribute docstring on the following line, and validates itself in
``__post_init__``.  This module holds only the generic parts: building those dataclasses
from YAML files and ``a.b=c`` command-line overrides, writing the resolved config back out,
and rendering ``--help``-style listings.  Nothing component-specific belongs here, and
there is deliberately no global args object: callers pass config instances explicitly.

Merge semantics, in order of increasing precedence: dataclass defaults (including values
set by a parent's ``default_factory``), the YAML file, command-line overrides.  Nested
dataclass sections merge key by key; every other value (lists, dicts, scalars) replaces.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import enum
import functools
import inspect
import os
import pathlib
import re
import textwrap
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from megatron_lcr.atomic import atomic_write_text

__all__ = [
    "ConfigError",
    "config_help",
    "deep_merge",
    "from_dict",
    "load_config",
    "parse_overrides",
    "save_resolved",
    "to_dict",
]

T = TypeVar("T")

_COMMAND_LINE = "command line"
_NONE_TYPE = type(None)
# Enum values that serialise to YAML as themselves; anything else is written by name.
_SCALARS = (str, int, float, bool)
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names its source and key."""

    def __init__(self, message: str) -> None:
        # Log lines and CLI errors must stay greppable, so fold any embedded newlines.
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message).strip()))


# --------------------------------------------------------------------------- YAML loading


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML-1.2-style booleans, no timestamps, and duplicate-key errors.

    YAML 1.1 turns ``no``/``on``/``off`` into bools and ``2024-01-01`` into a date; no config
    field is a date, and a run name or a ``padding_side: off`` must stay a string, while bool
    fields still reject those words with a clear type error.  Floats keep the YAML 1.1 rule
    (``1e-6`` is a string) because ``from_dict`` coerces those, and because a YAML-1.2 float
    resolver would turn a ``str`` field saved as ``1e-6`` into a float and break round trips.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        # PyYAML silently keeps the last duplicate, which hides copy-paste mistakes in
        # configs.  Merge keys (``<<``) are exempt: overriding merged keys is their purpose.
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}'", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":bool", ":timestamp"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Render a PyYAML error as ``at line L, column C: problem`` (1-based, one line)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)

    def at(mark: yaml.Mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = exc.problem_mark or exc.context_mark
    text = (f"at {at(mark)}: " if mark else "") + (exc.problem or exc.context or "invalid YAML")
    # The problem is often detected far from its cause (an unclosed bracket is reported at
    # end of file), so also point at where the enclosing construct started.
    if exc.problem and exc.context and exc.context_mark and exc.context_mark is not mark:
        text += f" ({exc.context} at {at(exc.context_mark)})"
    return text


def _read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping from ``path``; every failure becomes a ConfigError naming it."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{path}: cannot read config file ({reason})") from exc
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML {_yaml_problem(exc)}") from exc
    if data is None:  # an empty file (or only comments) means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {_describe(data)}")
    return data


# --------------------------------------------------------------------------- type helpers


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Where the data came from, and whether to build instances or only validate."""

    source: str
    """Label that prefixes every error message (a file path or "command line")."""
    partial: bool = False
    """Only check keys and value types; skip required-field checks and construction."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations, so `from __future__ import annotations`
    # in component modules works; it also strips Annotated[...] wrappers.
    return get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    # init=False fields are derived in __post_init__, so they are neither read nor written.
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    """``str 'abc'`` / ``int 3`` / ``null``: the "got ..." half of type errors."""
    if value is None:
        return "null"
    return f"{type(value).__name__} {_short_repr(value)}"


def _choices(tp: Any) -> list[Any]:
    """Allowed YAML values of a Literal or Enum type."""
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    return [m.value if isinstance(m.value, _SCALARS) else m.name for m in tp]


def _type_name(tp: Any) -> str:
    """Human-readable type, as written in error messages and ``config_help``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is _NONE_TYPE:
        return "None"
    if tp is Any:
        return "any"
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return " | ".join(repr(c) for c in _choices(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict) and args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _type_error(ctx: _Ctx, key: str, expected: str, value: Any) -> ConfigError:
    where = f"key '{key}'" if key else "top level"
    return ConfigError(f"{ctx.source}: {where} expects {expected}, got {_describe(value)}")


# --------------------------------------------------------------------------- coercion


def _coerce(tp: Any, value: Any, key: str, ctx: _Ctx, base: Any = None) -> Any:
    """Convert plain YAML ``value`` to type ``tp``; ``base`` seeds a nested dataclass."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        return _coerce_dataclass(tp, value, key, ctx, base)
    if origin is Literal:
        # Compare types too: True == 1, and a bool must not satisfy Literal[0, 1].
        if any(value == c and type(value) is type(c) for c in get_args(tp)):
            return value
        raise _type_error(ctx, key, "one of " + ", ".join(map(repr, get_args(tp))), value)
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key, ctx, base)
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return _coerce_container(tp, value, key, ctx)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(tp, value, key, ctx)
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _type_error(ctx, key, "path (str)", value)
    if tp in (bool, int, float, str):
        return _coerce_scalar(tp, value, key, ctx)
    raise TypeError(f"config key '{key}' has unsupported type {tp!r}")


def _coerce_scalar(tp: type, value: Any, key: str, ctx: _Ctx) -> Any:
    # bool is an int subclass, so exclude it explicitly for int/float; bool itself accepts
    # only real bools because 1/"yes" for a flag usually means a misplaced value.
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-6` (no dot) as a string; accept any float() spelling.
            with contextlib.suppress(ValueError):
                return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise _type_error(ctx, key, tp.__name__, value)


def _coerce_enum(tp: type[enum.Enum], value: Any, key: str, ctx: _Ctx) -> enum.Enum:
    if isinstance(value, tp):
        return value
    if not isinstance(value, bool):  # Enum(True) would match a member whose value is 1
        with contextlib.suppress(ValueError, TypeError):
            return tp(value)
    if isinstance(value, str) and value in tp.__members__:
        return tp[value]
    raise _type_error(ctx, key, "one of " + ", ".join(map(repr, _choices(tp))), value)


def _coerce_union(tp: Any, value: Any, key: str, ctx: _Ctx, base: Any) -> Any:
    args = get_args(tp)
    if value is None and _NONE_TYPE in args:
        return None
    members = [a for a in args if a is not _NONE_TYPE]
    if len(members) == 1:
        # Optional[X]: X's own error is more precise (it may point deep into a section).
        return _coerce(members[0], value, key, ctx, base)
    for member in members:  # first match wins, so order Union members narrow-to-wide
        with contextlib.suppress(ConfigError):
            return _coerce(member, value, key, ctx, base)
    raise _type_error(ctx, key, _type_name(tp), value)


def _coerce_container(tp: Any, value: Any, key: str, ctx: _Ctx) -> Any:
    origin, args = get_origin(tp) or tp, get_args(tp)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(ctx, key, _type_name(tp), value)
        if not args:
            return dict(value)
        key_tp, val_tp = args
        return {
            _coerce(key_tp, k, key, ctx): _coerce(val_tp, v, _join(key, str(k)), ctx)
            for k, v in value.items()
        }
    # Tuples are accepted for list fields (and vice versa) because Python-side defaults
    # and to_dict output use them interchangeably; strings are never sequences here.
    if not isinstance(value, (list, tuple)):
        raise _type_error(ctx, key, _type_name(tp), value)
    if origin is list:
        if not args:
            return list(value)
        return [_coerce(args[0], v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]", ctx) for i, v in enumerate(value))
    if len(value) != len(args):
        raise _type_error(ctx, key, f"{_type_name(tp)} (length {len(args)})", value)
    return tuple(_coerce(a, v, f"{key}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value)))


def _coerce_dataclass(cls: type, value: Any, key: str, ctx: _Ctx, base: Any) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _type_error(ctx, key, f"a mapping ({cls.__name__})", value)
    aliases = getattr(cls, "ALIASES", None)
    if aliases:
        try:
            value = expand_aliases(value, aliases, prefix=key)
        except ValueError as exc:
            raise ConfigError(f"{ctx.source}: {exc}") from None
    return _build_dataclass(cls, value, key, ctx, base)


def expand_aliases(data: Mapping, aliases: Mapping[str, str], *, prefix: str = "") -> dict:
    """Rewrite short alias keys (a dataclass's ``ALIASES``, e.g. ``tp``) to their field names.

    Aliases are not fields, so ``to_dict`` and saved configs always use the full names. A key given
    both as alias and full name must carry the same value in both.
    """
    out = {k: v for k, v in data.items() if k not in aliases}
    for alias, name in aliases.items():
        if alias not in data:
            continue
        if name in data and data[name] != data[alias]:
            raise ValueError(
                f"{_join(prefix, alias)}={data[alias]!r} conflicts with {_join(prefix, name)}={data[name]!r}"
            )
        out[name] = data[alias]
    return out


def _check_keys(cls: type, data: Mapping, prefix: str, ctx: _Ctx) -> None:
    """Reject non-string and unknown keys, suggesting the closest valid key."""
    valid = list(_init_fields(cls))
    for name in data:
        if not isinstance(name, str):
            where = f"under '{prefix}'" if prefix else "at top level"
            raise ConfigError(f"{ctx.source}: non-string key {name!r} {where}")
        if name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean '{_join(prefix, close[0])}'?" if close else (
            "valid keys: " + ", ".join(valid)
        )
        raise ConfigError(f"{ctx.source}: unknown key '{_join(prefix, name)}' ({hint})")


def _field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when absent (calls default_factory), or MISSING."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _section_base(f: dataclasses.Field) -> Any:
    """What a YAML section of field ``f`` merges over: the instance its ``default_factory`` builds when
    that factory chooses values (``lambda: TrainerConfig(steps=10)``); None (the class defaults) when
    the factory is the class itself. A default instance also holds what its ``__post_init__`` derived
    from its defaults (``rl.loss.name`` from ``rl.algorithm``); merging over it would carry those over
    as if the user had set them, instead of deriving them again from the loaded values."""
    if isinstance(f.default_factory, type):
        return None
    return _field_default(f)


def _build_dataclass(cls: type, data: Mapping, prefix: str, ctx: _Ctx, base: Any) -> Any:
    """Build ``cls`` from ``data``; fields absent from ``data`` come from ``base`` if given.

    ``base`` is the section's default instance (e.g. from a parent's default_factory), so a
    partial YAML section only changes the keys it names instead of resetting the rest.
    """
    _check_keys(cls, data, prefix, ctx)
    kwargs: dict[str, Any] = {}
    for name, f in _init_fields(cls).items():
        key = _join(prefix, name)
        if name in data:
            value = data[name]
            sub_base = None
            if isinstance(value, Mapping) and not ctx.partial:
                sub_base = getattr(base, name) if base is not None else _section_base(f)
                if not dataclasses.is_dataclass(sub_base) or isinstance(sub_base, type):
                    sub_base = None
            kwargs[name] = _coerce(_hints(cls)[name], value, key, ctx, sub_base)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is _MISSING and f.default_factory is _MISSING and not ctx.partial:
            raise ConfigError(f"{ctx.source}: missing required key '{key}'")
    if ctx.partial:
        return kwargs
    try:
        return cls(**kwargs)
    except ValueError as exc:  # includes ConfigError raised by a __post_init__
        where = f"{prefix}: " if prefix else ""
        raise ConfigError(f"{ctx.source}: {where}{exc}") from exc


# --------------------------------------------------------------------------- public API


def from_dict(cls: type[T], data: Mapping, *, source: str = "<dict>", prefix: str = "") -> T:
    """Recursively build dataclass ``cls`` from plain (YAML-shaped) ``data``.

    ``source`` prefixes every error message; ``prefix`` is the dotted path of ``cls`` inside
    a larger config, used in key names of messages.  Raises ConfigError for unknown or
    missing keys, wrong value types, and ValueErrors from any ``__post_init__``.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    return _coerce(cls, data, prefix, _Ctx(source))


def parse_overrides(items: Sequence[str]) -> dict:
    """Turn ``["a.b=1", "c=[x, y]"]`` into ``{"a": {"b": 1}, "c": ["x", "y"]}``.

    Values are parsed as YAML (with the loader used for files); later items win.  Setting
    a key below one that an earlier item set to a non-mapping value is a conflict.
    """
    if isinstance(items, str):  # a bare string would be split into one-character items
        raise TypeError("parse_overrides expects a sequence of 'key=value' strings")
    result: dict = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{_COMMAND_LINE}: override {item!r} is not a string")
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(
                f"{_COMMAND_LINE}: malformed override {item!r} (expected dotted.key=value)"
            )
        parts = [p.strip() for p in parts]
        try:
            value = yaml.load(text, Loader=_Loader)  # noqa: S506 - safe loader subclass
        except yaml.YAMLError as exc:
            message = f"cannot parse value of {item!r}: {_yaml_problem(exc)}"
            raise ConfigError(f"{_COMMAND_LINE}: {message}") from exc
        node = result
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                earlier = ".".join(parts[: depth + 1])
                message = f"override {item!r} conflicts with earlier value of '{earlier}'"
                raise ConfigError(f"{_COMMAND_LINE}: {message}")
        node[parts[-1]] = value
    return result


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Return ``base`` updated by ``override``; mappings merge recursively, else replace.

    Pure: neither input is modified and the result shares no mutable values with them.
    """
    merged = {k: _copy_plain(v) for k, v in base.items()}
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = _copy_plain(v)
    return merged


def _copy_plain(value: Any) -> Any:
    # Cheaper than copy.deepcopy and sufficient: merge inputs are YAML-shaped data.
    if isinstance(value, Mapping):
        return {k: _copy_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_plain(v) for v in value]
    return value


def load_config(
    cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> T:
    """Load ``cls`` from YAML file ``path`` (None: defaults only) plus ``key=value`` overrides.

    Overrides are validated on their own first so that a typo or bad value on the command
    line is reported as coming from the "command line" rather than from the file.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    data = {} if path is None else _read_yaml(path)
    override_data = parse_overrides(overrides)
    _coerce(cls, override_data, "", _Ctx(_COMMAND_LINE, partial=True))
    if path is not None:
        source = os.fspath(path)
    else:
        source = _COMMAND_LINE if overrides else "<defaults>"
    return from_dict(cls, deep_merge(data, override_data), source=source)


def to_dict(cfg: Any) -> dict:
    """Dataclass instance -> plain YAML-safe dict (Paths/Enums as strings, tuples as lists).

    ``init=False`` fields are omitted: they are derived, and from_dict would reject them.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {cfg!r}")
    return {name: _to_plain(getattr(cfg, name), name) for name in _init_fields(type(cfg))}


def _to_plain(value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {n: _to_plain(getattr(value, n), _join(key, n)) for n in _init_fields(type(value))}
    if isinstance(value, enum.Enum):
        return _to_plain(value.value, key) if isinstance(value.value, _SCALARS) else value.name
    # Convert to the exact builtin type: yaml.safe_dump refuses subclasses of str/int.
    for scalar in (bool, int, float, str):
        if isinstance(value, scalar):
            return scalar(value)
    if value is None:
        return None
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {_to_plain(k, key): _to_plain(v, _join(key, str(k))) for k, v in value.items()}
    raise TypeError(f"to_dict: key '{key}' holds {type(value).__name__}, not YAML-representable")


def _dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_resolved(cfg: Any, path: str | os.PathLike) -> None:
    """Atomically write ``to_dict(cfg)`` as YAML to ``path``, creating parent directories.

    Written through :func:`megatron_lcr.atomic.atomic_write_text` (temp file, fsync, rename), so
    readers (and a crash) see either the old file or the complete new one.
    Guarantees ``load_config(type(cfg), path) == cfg``.
    """
    text = _dump_yaml(to_dict(cfg))  # serialise first: a bad value must not touch disk
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- help


@functools.lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses' docs override inherited ones
        if klass is not object:
            docs.update(_class_attribute_docs(klass))
    return docs


def _class_attribute_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # no source (REPL, exec, frozen): no docs
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    docs = {}
    for stmt, nxt in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _nested_dataclass(tp: Any) -> tuple[type, str] | None:
    """The dataclass inside ``tp`` (plain, Optional, list/tuple/dict of) and its key suffix."""
    if _is_dataclass_type(tp):
        return tp, ""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not _NONE_TYPE]
        return _nested_dataclass(members[0]) if len(members) == 1 else None
    if origin in (list, tuple) and args and _is_dataclass_type(args[0]):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and _is_dataclass_type(args[1]):
        return args[1], ".<name>"
    return None


def _render_default(value: Any) -> str:
    if value is _MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return ""  # a section: its keys are listed on the following rows
    try:
        text = yaml.safe_dump(_to_plain(value, ""), default_flow_style=True, width=1 << 30)
    except (TypeError, yaml.YAMLError):
        return repr(value)
    return text.removesuffix("\n...\n").strip()  # safe_dump ends bare scalars with "..."


def _help_rows(cls: type, prefix: str, base: Any, seen: frozenset) -> Iterator[tuple]:
    docs, hints = _field_docs(cls), _hints(cls)
    for name, f in _init_fields(cls).items():
        key, tp = _join(prefix, name), hints[name]
        default = getattr(base, name) if base is not None else _field_default(f)
        yield key, _type_name(tp), _render_default(default), docs.get(name, "")
        nested = _nested_dataclass(tp)
        if nested is not None and nested[0] not in seen:  # guard self-referential configs
            sub, suffix = nested
            sub_base = default if isinstance(default, sub) and not suffix else None
            yield from _help_rows(sub, key + suffix, sub_base, seen | {sub})


def config_help(cls: type) -> str:
    """Plain-text table of every dotted key of ``cls``: type, default and one-line doc."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_help expects a dataclass type, got {cls!r}")
    rows = [("KEY", "TYPE", "DEFAULT", "DESCRIPTION"), *_help_rows(cls, "", None, frozenset({cls}))]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {doc}".rstrip()
        for k, t, d, doc in rows
    ]
    return "\n".join(lines) + "\n"
