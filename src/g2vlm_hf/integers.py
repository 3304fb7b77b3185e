"""The one test of "an integer setting" shared by the processors, the chunked path and the exporters."""

from __future__ import annotations

import numbers


def is_integer(value: object) -> bool:
    """Whether `value` is an integer: a Python or NumPy integer, not a bool (which Python counts as one), a float or
    a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
