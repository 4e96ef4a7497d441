"""Checks of the methods' settings, for their ``__post_init__``: each refuses a bad value with a message naming the
method, the field and the value (a bool is neither an integer nor a number here; NaN lies in no interval)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def check_integer(owner: str, name: str, value: object, lowest: int, highest: int | None = None) -> None:
    """``value`` an integer (NumPy's too) in ``[lowest, highest]`` (no upper bound for ``highest=None``).

    Raises:
        TypeError if it is not an integer; ValueError if it is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < lowest or (highest is not None and value > highest):
        bound = f">= {lowest}" if highest is None else f"in [{lowest}, {highest}]"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value!r}")


def check_fraction(owner: str, name: str, value: object, *, zero: bool = True) -> None:
    """``value`` a real number in ``[0, 1]``, or ``(0, 1]`` when ``zero`` is ``False``.

    Raises:
        TypeError if it is not a real number; ValueError if it lies outside (NaN does).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if not ((value >= 0 if zero else value > 0) and value <= 1):
        raise ValueError(f"{owner}: {name} must lie in {'[0, 1]' if zero else '(0, 1]'}, got {value!r}")


def check_fractions(owner: str, name: str, values: object) -> tuple[float, ...]:
    """``values`` a non-empty sequence of fractions in ``[0, 1]`` (:func:`check_fraction`), as a tuple of floats."""
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{owner}: {name} must be a non-empty sequence of numbers in [0, 1], got {values!r}")
    for index, value in enumerate(values):
        check_fraction(owner, f"{name}[{index}]", value)
    return tuple(float(value) for value in values)


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` one of ``choices``. Raises ValueError otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
