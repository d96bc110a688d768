"""Strict, typed config sections.

Every stage owns a `Section` subclass with its defaults; the pipeline config (flows/config.py) composes them.
Unknown keys, wrong types and out-of-range values fail before any compute, as one line:
    config error in <file>: <key.path>: expected <what>, found <value>
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A user mistake in a config file or a --set override; the message is one actionable line."""


class Section(BaseModel):
    """Base of every config section: no unknown keys, no silent type coercion (a "3" is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (used for manifests and cache keys)."""
        return self.model_dump(mode="json")


def _expected(err: dict[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "no such key (check the spelling)"
    if kind == "missing":
        return "a value (this key is required)"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"a value {op} {bound:g}" if isinstance(bound, float) else f"a value {op} {bound}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"].lower().replace("input should be ", "")


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    """Turn pydantic's report into our one-line message (first error; the rest are usually consequences)."""
    err = exc.errors(include_url=False)[0]
    path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]) if p != "")
    found = "nothing" if err["type"] == "missing" else repr(err.get("input"))
    if err["type"] == "extra_forbidden":
        return f"config error in {source}: {path}: unknown key (found {found})"
    return f"config error in {source}: {path}: expected {_expected(err)}, found {found}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a parse error or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config error: {p}: no such file")
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config error in {p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config error: {p}: cannot read it ({e.strerror or e})") from None
    except RecursionError:
        raise ConfigError(f"config error in {p}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config error in {p}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {p}: expected a mapping of sections at the top, found {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; override wins; neither input is modified."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Loader(yaml.SafeLoader):
    """YAML as users write it: PyYAML follows YAML 1.1, where `2e-5` and `1e3` (no dot) are strings, so
    `learning_rate: 2e-5` was refused as 'expected a valid number'. This loader also reads them as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so 3 is an int and true a bool)."""
    if "=" not in item:
        raise ConfigError(f"config error in --set {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config error in --set {item!r}: empty key path")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides onto a raw config mapping (validation happens afterwards, on the whole)."""
    out = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return out
