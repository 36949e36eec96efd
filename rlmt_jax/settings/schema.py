"""Frozen dataclasses from nested dicts (parsed YAML), type-checked field by field; errors name the dotted key.

    schema = Schema(RunConfig, aliases={"learning_rate": "optimizer.lr"})
    schema.apply_override(values, "rollout.temperature=0.8")   # into the nested dict, value parsed as YAML
    cfg = schema.build(values)                                  # UserError: "config key 'rollout.n' must be ..."
    schema.to_dict(cfg)                                         # back to plain dicts and lists

Supported annotations: bool, int, float, str, None, Literal[...], unions of these, tuple[T, ...],
tuple[A, B] (from YAML lists), and nested dataclasses (sections). Missing keys take the field defaults.
A float field takes finite numbers only: `inf`, `.inf`, `1e999` and `nan` are refused naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from rlmt_jax.core.errors import UserError

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def type_words(hint: Any) -> str:
    """Words for an annotation: 'an integer or null', 'a list of 2 values (a number, a number)'."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_words(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({type_words(args[0])})"
        return f"a list of {len(args)} values ({', '.join(type_words(a) for a in args)})"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _non_finite(value: Any) -> bool:
    """Whether `value` is a number (or the text of one, as YAML 1.1 leaves `inf` and `nan`) that is not finite."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


class Schema:
    """The keys and types of a root dataclass whose fields are values or nested dataclass sections."""

    def __init__(self, root: type, aliases: Mapping[str, str] | None = None):
        self.root = root
        self.aliases = dict(aliases or {})

    def keys(self, sections: bool = False, cls: type | None = None, prefix: str = "") -> list[str]:
        """Every dotted value key, e.g. 'rollout.temperature' (and the sections, e.g. 'rollout', if asked)."""
        out = []
        for name, hint in _field_types(cls or self.root).items():
            if dataclasses.is_dataclass(hint):
                out += [f"{prefix}{name}"] if sections else []
                out += self.keys(sections, hint, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    def unknown_key(self, dotted: str, cls: type, prefix: str) -> UserError:
        """'unknown config key X: did you mean Y?', Y: an alias, the same name in another section, the closest."""
        leaf = dotted.rsplit(".", 1)[-1]
        close = [self.aliases[leaf]] if leaf in self.aliases else []
        close = close or [k for k in self.keys() if k.rsplit(".", 1)[-1] == leaf]
        candidates = [k for k in self.keys(sections=True) if not dotted.startswith(k + ".")]  # not its own section
        close = close or difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
        if close:
            return UserError(f"unknown config key '{dotted}': did you mean '{close[0]}'?")
        known = ", ".join(prefix + name for name in _field_types(cls))
        return UserError(f"unknown config key '{dotted}': the keys here are {known}")

    def build(self, values: dict, cls: type | None = None, prefix: str = "") -> Any:
        """An instance of `cls` (default: the root) from a nested dict; UserError naming a bad key or value."""
        cls = cls or self.root
        types_ = _field_types(cls)
        kwargs = {}
        for name, value in values.items():
            dotted = f"{prefix}{name}"
            if not isinstance(name, str) or name not in types_:
                raise self.unknown_key(str(dotted), cls, prefix)
            kwargs[name] = self._convert(types_[name], value, dotted)
        return cls(**kwargs)

    def _convert(self, hint: Any, value: Any, key: str) -> Any:
        """`value` checked against the annotation `hint`, in the field's type."""
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' is a section: expected a mapping, got {value!r}")
            return self.build(value, hint, f"{key}.")
        if origin in (typing.Union, types.UnionType):
            args = typing.get_args(hint)
            if value is None and type(None) in args:
                return None
            if float in args and _non_finite(value):  # the finite-number message, not "a number or null"
                return self._convert(float, value, key)
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return self._convert(arg, value, key)
                except UserError:
                    pass
            raise UserError(f"config key '{key}' must be {type_words(hint)}, got {value!r}")
        if origin is Literal:
            if isinstance(value, bool) or value not in typing.get_args(hint):
                raise UserError(f"config key '{key}' must be {type_words(hint)}, got {value!r}")
            return value
        if origin is tuple:
            args = typing.get_args(hint)
            variable = len(args) == 2 and args[1] is Ellipsis
            if not isinstance(value, (list, tuple)) or (not variable and len(value) != len(args)):
                raise UserError(f"config key '{key}' must be {type_words(hint)}, got {value!r}")
            item_types = [args[0]] * len(value) if variable else args
            return tuple(self._convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
        if hint is bool:
            if not isinstance(value, bool):
                raise UserError(f"config key '{key}' must be true or false, got {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"config key '{key}' must be an integer, got {value!r}")
            return value
        if hint is float:
            if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as text: take what Python reads
                try:
                    value = float(value)
                except ValueError:
                    raise UserError(f"config key '{key}' must be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"config key '{key}' must be a number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
        if hint is str:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise UserError(f"config key '{key}' must be a string, got {value!r}")
            return str(value)
        raise TypeError(f"config field '{key}' has an unsupported annotation {hint!r}")

    def apply_override(self, values: dict, override: str) -> None:
        """Sets `section.key=value` in the nested dict `values`; the value is read as a YAML scalar or list."""
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override '{override}' must be key=value, e.g. rollout.temperature=0.8")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        cls, node = self.root, values
        for depth, part in enumerate(parts):
            types_ = _field_types(cls)
            prefix = ".".join(parts[:depth])
            if part not in types_:
                raise self.unknown_key(key, cls, f"{prefix}." if prefix else "")
            if depth == len(parts) - 1:
                node[part] = value
                return
            if not dataclasses.is_dataclass(types_[part]):
                raise UserError(f"config key '{'.'.join(parts[:depth + 1])}' is a value, not a section: "
                                f"'{key}' does not exist")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], types_[part]

    @staticmethod
    def to_dict(obj: Any) -> dict:
        """Nested plain dicts and lists (tuples become lists), every field present."""
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = Schema.to_dict(value)
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out
