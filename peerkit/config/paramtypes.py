"""Parameter types (sans-IO): checking values against declared types, parsing text, errors.

Supported declared types: ``int``, ``float`` (an int is accepted and converted), ``str``,
``bool``, ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``, ``dict[str, T]``, ``Literal[...]``,
unions such as ``T | None``, and ``Any`` (any value msgpack carries: None, int, float, str,
bool, lists and dicts with str keys). :mod:`peerkit.params` re-exports the public names.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from typing import Any, Literal, Union

from ..errors import PeerkitError

__all__ = [
    "ConfigError",
    "OverrideError",
    "ParamTypeError",
    "UnknownParamError",
    "check_supported",
    "check_value",
    "parse_text",
    "type_name",
]


class ConfigError(PeerkitError):
    """A configuration problem: bad file, unknown parameter, unbound source, bad value..."""


class ParamTypeError(ConfigError, TypeError):
    """A parameter value does not match the declared type (or cannot be parsed as it)."""


class UnknownParamError(ConfigError, LookupError):
    """A parameter name the peer class does not declare."""


class OverrideError(ConfigError):
    """Bad command-line overrides (see :func:`~peerkit.params.parse_overrides`)."""


_SCALARS = (int, float, str, bool)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def check_supported(tp: Any, where: str) -> None:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp in _SCALARS or tp is type(None) or origin is Literal:
        return
    if _is_union(tp):
        for a in args:
            check_supported(a, where)
        return
    if origin is list and len(args) == 1:
        check_supported(args[0], where)
        return
    if origin is tuple and args:
        for a in args:
            if a is not Ellipsis:
                check_supported(a, where)
        return
    if origin is dict and len(args) == 2 and args[0] is str:
        check_supported(args[1], where)
        return
    raise ConfigError(
        f"parameter {where} has the unsupported type {type_name(tp)}; use int, float, str, "
        "bool, list[T], tuple[T, ...], dict[str, T], Literal[...], unions or Any"
    )


def type_name(tp: Any) -> str:
    """A readable name for a declared type: ``int``, ``list[float]``, ``str | None``."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class _Mismatch(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _convert(tp: Any, value: Any, path: str) -> Any:
    where = f" at {path}" if path else ""
    if tp is Any:
        _check_portable(value, path)
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch(f"expected None{where}, got {_describe(value)}")
    if tp is bool:
        if type(value) is bool:
            return value
        raise _Mismatch(f"expected bool{where}, got {_describe(value)}")
    if tp is int:
        if type(value) is int:
            return value
        raise _Mismatch(f"expected int{where}, got {_describe(value)}")
    if tp is float:
        if type(value) is float:
            return value
        if type(value) is int:
            return float(value)
        raise _Mismatch(f"expected float{where}, got {_describe(value)}")
    if tp is str:
        if type(value) is str:
            return value
        raise _Mismatch(f"expected str{where}, got {_describe(value)}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        raise _Mismatch(
            f"expected one of {', '.join(repr(a) for a in args)}{where}, got {_describe(value)}"
        )
    if _is_union(tp):
        problems = []
        for a in args:
            try:
                return _convert(a, value, path)
            except _Mismatch as exc:
                problems.append(exc.detail)
        raise _Mismatch(f"expected {type_name(tp)}{where}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch(f"expected {type_name(tp)}{where}, got {_describe(value)}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch(f"expected {type_name(tp)}{where}, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch(
                f"expected {type_name(tp)} ({len(args)} items){where}, got {_describe(value)}"
            )
        return tuple(
            _convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"expected {type_name(tp)}{where}, got {_describe(value)}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _Mismatch(f"expected str keys{where}, got {_describe(k)}")
            out[k] = _convert(args[1], v, f"{path}[{k!r}]")
        return out
    raise _Mismatch(f"unsupported type {type_name(tp)}")


def _check_portable(value: Any, path: str) -> None:
    if value is None or type(value) in (int, float, str, bool):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_portable(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise _Mismatch(f"dictionary keys must be str, got {_describe(k)}")
            _check_portable(v, f"{path}[{k!r}]")
        return
    where = f" at {path}" if path else ""
    raise _Mismatch(
        f"{_describe(value)}{where} cannot travel between peers (use None, int, float, str, "
        "bool, lists and dicts with str keys)"
    )


def check_value(tp: Any, value: Any, *, name: str, source: str) -> Any:
    """Check ``value`` against the declared type ``tp``; return it (possibly converted:
    int → float, list ↔ tuple). :class:`ParamTypeError` names the parameter and ``source``."""
    try:
        return _convert(tp, value, "")
    except _Mismatch as exc:
        raise ParamTypeError(
            f"parameter {name!r} ({source}): {exc.detail}; it is declared as {type_name(tp)}"
        ) from None


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_NONE = frozenset({"none", "null"})


def _parse(tp: Any, text: str) -> Any:
    if tp is str:
        return text
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return int(text.strip(), 0)  # 0x10, 0o17, 0b101
        except ValueError:
            raise _Mismatch(f"{text!r} is not an int") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise _Mismatch(f"{text!r} is not a float") from None
        if math.isnan(value) and text.strip().lower() != "nan":
            raise _Mismatch(f"{text!r} is not a float")
        return value
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _Mismatch(f"{text!r} is not a bool (use true/false, 1/0, yes/no, on/off)")
    if tp is type(None):
        if text.strip().lower() in _NONE:
            return None
        raise _Mismatch(f"{text!r} is not none")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            try:
                if _parse(type(choice), text) == choice:
                    return choice
            except _Mismatch:
                continue
        raise _Mismatch(f"{text!r} is not one of {', '.join(repr(a) for a in args)}")
    if _is_union(tp):
        # str last, so that "12" for int | str is the int, "none" for str | None is None
        ordered = sorted(args, key=lambda a: a is str)
        for a in ordered:
            try:
                return _parse(a, text)
            except _Mismatch:
                continue
        raise _Mismatch(f"{text!r} is not a {type_name(tp)}")
    # list, tuple, dict, Any: TOML inline syntax (`[1, 2]`, `{a = 1}`, `"text"`, `3.5`)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if tp is Any:
            return text
        raise _Mismatch(
            f"{text!r} is not a {type_name(tp)} in TOML inline syntax "
            "(e.g. [1, 2, 3] or {key = 1})"
        ) from None
    return _convert(tp, value, "")


def parse_text(tp: Any, text: str, *, name: str, source: str) -> Any:
    """Parse a command-line string as the declared type ``tp``.

    ``int``/``float`` as Python literals, ``bool`` from true/false, 1/0, yes/no, on/off,
    ``str`` as is, ``None`` from none/null, lists and dicts in TOML inline syntax
    (``[1, 2]``, ``{gain = 2.0}``). :class:`ParamTypeError` names the parameter and source.
    """
    try:
        return _parse(tp, text)
    except _Mismatch as exc:
        raise ParamTypeError(
            f"parameter {name!r} ({source}): {exc.detail}; it is declared as {type_name(tp)}"
        ) from None
