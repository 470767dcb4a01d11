"""`SweepError`, the user errors of a sweep (grid spec, names, files, output folder), and the checks that raise it.

A leaf module: the metric registry (`metrics`) and the sweep (`sweep`) both raise these without importing each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SweepError(ValueError):
    """A user error in a sweep (grid spec, names, files, output folder); the message says what to fix."""


def positive_int(value: Any, where: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (bools refused), else SweepError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SweepError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return int(value)
