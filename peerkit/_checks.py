"""Checks of user-given options, shared by every part of peerkit (sans-IO, internal)."""

from __future__ import annotations

import math

from .errors import PeerkitError


def is_positive_seconds(value: object) -> bool:
    """A finite number of seconds above zero (not a bool, not NaN, not infinity)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0  # false for NaN too
        and not math.isinf(value)
    )


def check_seconds(name: str, value: object) -> float:
    """``value`` as float, or a :class:`PeerkitError` naming ``name``."""
    if not is_positive_seconds(value):
        raise PeerkitError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_seconds_or_zero(name: str, value: object) -> float:
    """``value`` as float if it is zero or a positive number of seconds, else a
    :class:`PeerkitError` naming ``name``."""
    if value == 0 and isinstance(value, int | float) and not isinstance(value, bool):
        return 0.0
    if not is_positive_seconds(value):
        raise PeerkitError(
            f"{name} must be a number of seconds, 0 or more (0 turns it off), got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def check_positive_int(name: str, value: object) -> int:
    """``value`` if it is an int above zero (not a bool), else a :class:`PeerkitError`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PeerkitError(f"{name} must be a positive integer, got {value!r}")
    return value
