"""Checked reads of config.json values: a value of the wrong type, NaN, infinite or out of range is
a ValueError naming where it sits in the file, not a TypeError (or ZeroDivisionError) from
whatever arithmetic first touches it. JSON booleans are not numbers here, though Python's are."""
from __future__ import annotations

import math
from typing import Any


def config_number(v: Any, where: str, *, minimum: float | None = None, positive: bool = False,
                  optional: bool = False) -> float | None:
    """v as a finite float, > 0 when `positive`, >= `minimum` when given; None passes only
    when `optional`."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{where} must be positive, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be at least {minimum}, got {v!r}")
    return float(v)


def config_int(v: Any, where: str, *, minimum: int = 1, optional: bool = False) -> int | None:
    """v as an int >= minimum; None passes only when `optional`."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{where} must be {what}, got {v!r}")
    return v


def config_dict(v: Any, where: str) -> dict:
    """v as a dict (a copy); None is an empty one."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where} must be an object (or null), got {v!r}")
    return dict(v)
