"""Parameter checks at the public edges: each raises :class:`~workbench.errors.ParameterError` naming the
parameter, the value given and what is allowed.

Values arrive from YAML, CLIs and notebooks, so numbers may come as text (``tile_mpp='0.5'``): they are
refused, never coerced, because a silently coerced value is a silent wrong result waiting to happen
(``batch_size=2.5`` → 2). Booleans are not integers here (``True`` is not a batch size).

Chosen over pydantic for these call sites: a function call per parameter keeps the signatures of the stage
functions unchanged and the messages in one style; pydantic/pandera stay where a whole record or table is
validated (manifests).
"""

from __future__ import annotations

import math
import numbers

from workbench.errors import ParameterError

__all__ = [
    "check_bool",
    "check_bounded_k",
    "check_choice",
    "check_float",
    "check_int",
    "check_int_list",
    "check_optional",
    "check_str",
]


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *, where: str | None = None) -> int:
    """An integer (not a bool, not a float, not text) within [lo, hi]; returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = _range_text(lo, hi, "an integer")
        raise ParameterError(
            f"{_where(where)}{name}={value!r} ({type(value).__name__}) is not allowed: {name} must be {allowed}"
        )
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ParameterError(
            f"{_where(where)}{name}={value!r} is out of range: {name} must be {_range_text(lo, hi, 'an integer')}"
        )
    return value


def check_float(
    name: str,
    value,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    where: str | None = None,
) -> float:
    """A finite real number (int or float, not a bool, not text) within the bounds; returns ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(
            f"{_where(where)}{name}={value!r} ({type(value).__name__}) is not allowed: {name} "
            f"must be {_range_text(lo, hi, 'a number', lo_open, hi_open)}"
        )
    value = float(value)
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and (value >= hi if hi_open else value > hi)
    if bad:
        raise ParameterError(
            f"{_where(where)}{name}={value!r} is out of range: {name} must be "
            f"{_range_text(lo, hi, 'a finite number', lo_open, hi_open)}"
        )
    return value


def check_choice(name: str, value, choices, *, where: str | None = None):
    """One of ``choices`` (compared by equality and type, so ``1`` is not ``True``)."""
    choices = tuple(choices)
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ParameterError(
            f"{_where(where)}{name}={value!r} is not allowed: {name} must be one of "
            f"{', '.join(repr(c) for c in choices)}"
        )
    return value


def check_bool(name: str, value, *, where: str | None = None) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(
            f"{_where(where)}{name}={value!r} ({type(value).__name__}) is not allowed: {name} must be True or False"
        )
    return value


def check_str(name: str, value, *, where: str | None = None, max_len: int = 10_000) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise ParameterError(
            f"{_where(where)}{name}={value!r} is not allowed: {name} must be text (at most {max_len} characters)"
        )
    return value


def check_optional(check, name: str, value, *args, **kwargs):
    """``None`` passes; anything else goes through ``check``."""
    return None if value is None else check(name, value, *args, **kwargs)


def check_int_list(
    name: str, value, lo: int | None = None, hi: int | None = None, *, where: str | None = None
) -> list[int]:
    """A non-empty list/tuple of integers, each within [lo, hi]."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ParameterError(f"{_where(where)}{name}={value!r} is not allowed: {name} must be a list of integers")
    out = [check_int(f"{name}[{i}]", v, lo, hi, where=where) for i, v in enumerate(value)]
    if not out:
        raise ParameterError(f"{_where(where)}{name}={value!r} is not allowed: {name} must not be empty")
    return out


def check_bounded_k(name: str, value, available: int, *, where: str | None = None) -> int:
    """A positive integer; values above ``available`` (what exists) are bounded to it."""
    k = check_int(name, value, 1, None, where=where)
    return min(k, max(int(available), 1))


def _range_text(lo, hi, what, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{what} {'<' if hi_open else '<='} {hi}"
    return what
