"""Configuration files: any tree of configuration dataclasses read from TOML, checked, and written back.

A file is a tree of tables named after the dataclass fields that hold them: ``[tracker.fit.priors]`` sets
fields of ``TrackerConfig.fit.priors``. What a file leaves out keeps the default it is applied to (each
command has its own, see ``command_configs.py``), and command-line options are applied over the file as dotted
keys (``{"tracker.n_shape": 80}``). Everything is checked before it is used, and a mistake is one
:class:`~engine.errors.UserError` line naming the file and the key:

- a key no dataclass field has (with the keys that exist), a table where a value belongs or the reverse;
- a value of the wrong type (``int``, ``float``, ``bool``, ``str``, ``Literal`` choices, ``Path``, tuples of a
  fixed or any length, ``dict[str, ...]``, nested dataclasses, and ``X | None``, whose None is the string
  ``"none"`` since TOML has no null);
- a number out of range: numbers must be finite and, unless their annotation says otherwise with
  ``Annotated[float, Range(low, high)]``, not negative (every number in our configurations is a count, a
  weight, a size, a time or a tolerance);
- whatever a dataclass's own ``__post_init__`` refuses (its ValueError, named by the table).

Fields of other types (tensors, dtypes) are not configuration: they keep their defaults and are left out
of dumps. :func:`to_tree` gives the plain tree of a resolved configuration (for ``meta.json``), and
:func:`dump_toml` writes it as TOML that :func:`read_tree` reads back to the same configuration. A result's
JSON (``meta.json``, ``session.json``, a batch ``summary.json``) is read through its ``"config"`` entry, so
the configuration a result was made with can be given back as it is.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from engine.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the backport (a dependency there)
    import tomli as tomllib

T = TypeVar("T")
#: TOML has no null: an optional field is set to None with this string (and dumped as it).
NONE = "none"
#: The key a result's JSON keeps its configuration under.
RESULT_KEY = "config"


@dataclass(frozen=True)
class Range:
    """Allowed interval of a number (or of each number of a tuple); None leaves that side open."""

    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"of at least {self.low:g}"
        return f"of at most {self.high:g}" if self.high is not None else "any number"


NON_NEGATIVE = Range(0.0)
#: For numbers that may be negative (positions, offsets): ``Annotated[float, ANY_NUMBER]``.
ANY_NUMBER = Range()


class _Unsupported(Exception):
    """A field type that is not configuration (see the module docstring)."""


def read_tree(path: Path) -> dict[str, Any]:
    """The configuration tree in a TOML file, or in a result's JSON (its ``"config"`` entry)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file; write one with 'run_stream.py config COMMAND > FILE.toml'") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--config {path}: cannot be read ({error}); give a TOML file") from None
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
        # meta.json and summary.json keep it at the top, session.json with the recorder's metadata.
        for holder in (content, content.get("metadata") if isinstance(content, dict) else None):
            if isinstance(holder, dict) and isinstance(holder.get(RESULT_KEY), dict):
                return holder[RESULT_KEY]
        raise UserError(f"{path}: holds no \"{RESULT_KEY}\" entry; give a TOML file or a result's meta.json / session.json")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None


def set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested tree, making the tables on the way."""
    *tables, key = dotted.split(".")
    for name in tables:
        tree = tree.setdefault(name, {})
    tree[key] = value


def resolve(default: T, path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """``default`` with the file at ``path`` applied, then ``overrides`` (dotted keys; None values are skipped)."""
    resolved = default if path is None else apply(default, read_tree(path), str(path))
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if not given:
        return resolved
    tree: dict[str, Any] = {}
    for key, value in given.items():
        set_key(tree, key, to_tree(value) if dataclasses.is_dataclass(value) else _plain(value))
    return apply(resolved, tree, "the command line")


def apply(current: T, tree: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """``current`` (a dataclass instance) with the values of ``tree`` set, every one checked."""
    cls = type(current)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    changes: dict[str, Any] = {}
    for key, value in tree.items():
        where = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(name for name in fields if _configurable(hints[name]))
            raise UserError(f"{source}: unknown key '{where}'{_in_table(prefix)}; the keys there are: {known}")
        try:
            changes[key] = _convert(hints[key], value, getattr(current, key), source, where)
        except _Unsupported:
            raise UserError(f"{source}: '{where}' cannot be set in a configuration file") from None
    try:
        return dataclasses.replace(current, **changes)
    except (ValueError, TypeError) as error:
        raise UserError(f"{source}: {_table_name(prefix)}: {error}") from None


def to_tree(config: Any) -> dict[str, Any]:
    """The plain tree of a dataclass instance: tables, numbers, strings, lists; None as ``"none"``."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    tree: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if field.init and _configurable(hints[field.name]):
            value = getattr(config, field.name)
            tree[field.name] = to_tree(value) if dataclasses.is_dataclass(value) else _plain(value)
    return tree


def dump_toml(config: Any, header: str = "") -> str:
    """``config`` (a dataclass instance) as a TOML document, each key and table under the comment its source
    gives it (see :func:`field_notes`), or a table under its class's summary."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    _write_table(lines, config, [])
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Checking one value against its annotation


def _convert(hint: Any, value: Any, current: Any, source: str, where: str) -> Any:
    hint, bounds = _unannotated(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if len(options) != 1 or len(args) != 2:
            raise _Unsupported
        if value == NONE:
            return None
        return _convert(_annotated(options[0], bounds), value, current, source, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise UserError(f"{source}: '{where}' is a table ([{where}]), not a single value")
        base = current if current is not None else _default_instance(hint, source, where)
        return apply(base, value, source, f"{where}.")
    if isinstance(value, Mapping) and origin is not dict:
        raise UserError(f"{source}: '{where}' is a single value, not a table; write {where.rpartition('.')[2]} = ...")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: '{where}' = {_shown(value)}: choose one of {', '.join(_shown(a) for a in args)}")
        return value
    if origin is tuple:
        return _tuple(args, bounds, value, source, where)
    if origin is dict:
        if not isinstance(value, Mapping) or args[0] is not str:
            raise UserError(f"{source}: '{where}' must be a table of names and values")
        merged = dict(current or {})
        for name, item in value.items():
            merged[name] = _convert(_annotated(args[1], bounds), item, merged.get(name), source, f"{where}.{name}")
        return merged
    return _scalar(hint, bounds, value, source, where)


def _scalar(hint: Any, bounds: Range | None, value: Any, source: str, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: '{where}' = {_shown(value)} must be true or false")
        return value
    if hint in (int, float):
        whole = hint is int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
            wanted = "a whole number" if whole else "a number"
            raise UserError(f"{source}: '{where}' = {_shown(value)} must be {wanted}")
        if not math.isfinite(value):
            raise UserError(f"{source}: '{where}' = {value} must be a finite number")
        allowed = bounds or NON_NEGATIVE
        if (allowed.low is not None and value < allowed.low) or (allowed.high is not None and value > allowed.high):
            raise UserError(f"{source}: '{where}' = {value:g} is out of range; give a number {allowed.describe()}")
        return hint(value)
    if hint in (str, Path):
        if not isinstance(value, str):
            raise UserError(f"{source}: '{where}' = {_shown(value)} must be a string (in quotes)")
        return hint(value)
    raise _Unsupported


def _tuple(args: tuple[Any, ...], bounds: Range | None, value: Any, source: str, where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{source}: '{where}' = {_shown(value)} must be a list, e.g. [1, 2]")
    items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
    if len(items) != len(value):
        raise UserError(f"{source}: '{where}' has {len(value)} values; give {len(items)}")
    return tuple(_convert(_annotated(item, bounds), v, None, source, f"{where}[{i}]") for i, (item, v) in enumerate(zip(items, value)))


def _unannotated(hint: Any) -> tuple[Any, Range | None]:
    if typing.get_origin(hint) is typing.Annotated:
        ranges = [extra for extra in hint.__metadata__ if isinstance(extra, Range)]
        return hint.__origin__, ranges[0] if ranges else None
    return hint, None


def _annotated(hint: Any, bounds: Range | None) -> Any:
    return hint if bounds is None else typing.Annotated[hint, bounds]


def _default_instance(cls: type, source: str, where: str) -> Any:
    try:
        return cls()
    except TypeError:
        raise UserError(f"{source}: '{where}' cannot be set in a configuration file") from None


def _configurable(hint: Any) -> bool:
    """Whether a field of this type is configuration (see the module docstring)."""
    hint, _ = _unannotated(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        return len(options) == 1 and len(args) == 2 and _configurable(options[0])
    if origin in (tuple, dict):
        return all(arg is Ellipsis or _configurable(arg) for arg in args)
    return origin is Literal or dataclasses.is_dataclass(hint) or hint in (bool, int, float, str, Path)


def _plain(value: Any) -> Any:
    if value is None:
        return NONE
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, bool)) else repr(value)


def _in_table(prefix: str) -> str:
    return f" in [{prefix[:-1]}]" if prefix else ""


def _table_name(prefix: str) -> str:
    return f"[{prefix[:-1]}]" if prefix else "the configuration"


# ---------------------------------------------------------------------------------------------------------------
# Writing TOML (the standard library reads it but does not write it)


@functools.cache
def field_notes(cls: type) -> dict[str, str]:
    """Each field's comment in the source of dataclass ``cls``: its ``#:`` lines above, a ``# ...`` after it on
    its line, and the string below it (empty where the source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(source).body[0].body
        comments = {token.start[0]: token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
                    if token.type == tokenize.COMMENT}  # fmt: skip
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    lines = source.splitlines()
    notes: dict[str, str] = {}
    for index, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].lstrip().startswith("#:"):
            above.insert(0, lines[row].lstrip()[2:].strip())
            row -= 1
        trailing = comments.get(node.end_lineno, "")
        parts = [*above, trailing.lstrip("#").strip() if trailing and not lines[node.end_lineno - 1].lstrip().startswith("#") else ""]
        following = body[index + 1] if index + 1 < len(body) else None
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            parts.append(" ".join(following.value.value.split()))
        notes[node.target.id] = " ".join(part for part in parts if part)
    return notes


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, 110)]


def _write_table(lines: list[str], config: Any, path: list[str], note: str = "") -> None:
    tree = to_tree(config)
    notes = field_notes(type(config))
    summary = (type(config).__doc__ or "").strip().splitlines()
    if path:
        lines.append("")
        if not note and summary and not summary[0].startswith(type(config).__name__ + "("):
            note = summary[0]
        lines.extend(_comment(note))
        lines.append(f"[{'.'.join(path)}]")
    tables = []
    for key, value in tree.items():
        nested = getattr(config, key)
        if dataclasses.is_dataclass(nested) or (isinstance(value, dict) and value):
            tables.append((key, nested))
        else:
            lines.extend(_comment(notes.get(key, "")))
            lines.append(f"{key} = {_toml_value(value)}")
    for key, nested in tables:
        if dataclasses.is_dataclass(nested):
            _write_table(lines, nested, [*path, key], notes.get(key, ""))
        else:
            lines.append("")
            lines.extend(_comment(notes.get(key, "")))
            lines.append(f"[{'.'.join([*path, key])}]")
            lines.extend(f"{_toml_key(name)} = {_toml_value(item)}" for name, item in _plain(nested).items())


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not a TOML value")
