"""One dataclass per stage drives both the CLI and the Python API.

Each field's docstring (the string literal under it) is its ``--help`` text, so there is
exactly one place where a default and its explanation live. A config also loads from a
YAML or JSON file, so a cluster job is one file; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from llm_sae.errors import LlmSaeError

T = TypeVar("T")


class ConfigError(LlmSaeError, ValueError):
    """A config file or value that cannot be used; the message says how to fix it."""


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it (inherited ones too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a value read from YAML/JSON or the command line into the field's type."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field {name!r} may not be null")
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        items = [_coerce(v, item_tp, name) for v in value]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"config field {name!r}: {value!r} is not a boolean (use true/false)")
        return bool(value)
    if inner in (int, float, str):
        try:
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return inner(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config field {name!r}: {value!r} is not a valid {inner.__name__}; give "
                f"--{name.replace('_', '-')} a value of that type"
            ) from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config from a plain dict; unknown keys are an error that lists the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown}; valid fields are: {sorted(fields)}"
        )
    hints = _hints(cls)
    return cls(**{k: _coerce(v, hints[k], k) for k, v in data.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config (paths as strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def load_config(cls: type[T], path: str | Path) -> T:
    """Load a config from a ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"config file {path} cannot be read ({_one_line(e)}); fix its syntax") from None
    except Exception as e:  # yaml.YAMLError, without importing yaml for a JSON file
        if type(e).__module__.split(".")[0] != "yaml":
            raise
        raise ConfigError(f"config file {path} is not valid YAML ({_one_line(e)}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value")
    return from_dict(cls, data)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    positional: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> None:
    """Add one ``--flag`` per dataclass field (``--config FILE`` too) to ``parser``.

    Defaults are not set on the parser: a flag left out stays ``None`` so that
    ``from_args`` can tell it apart from a value given explicitly, and the config file
    (if any) and the dataclass default decide it.
    """
    docs = field_docs(cls)
    hints = _hints(cls)
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file with any of the fields below"
    )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init or f.name in exclude:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        if not required and default not in (None, "", [], ()):
            help_text += f" (default: {default})"
        elif required:
            help_text += " (required)"
        help_text = help_text.replace("%", "%%")
        if f.name in positional:
            parser.add_argument(f.name, help=help_text, nargs="?" if not required else None)
            continue
        flag = "--" + f.name.replace("_", "-")
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif origin in (list, tuple):
            # Repeatable and comma-separated both work: --hook a --hook b, or --hook a,b.
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, dest=f.name, default=None, help=help_text, metavar=f.name.upper()
            )


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build a config from parsed flags: CLI flag > ``--config`` file > dataclass default."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        base = load_config(cls, args.config)
        data.update(to_dict(base))
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is None:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) in (list, tuple) and isinstance(value, list):
            value = [part for v in value for part in str(v).split(",") if part]
        data[f.name] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"missing required option(s): {flags}")
    return from_dict(cls, data)
