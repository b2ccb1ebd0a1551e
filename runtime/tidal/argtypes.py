"""argparse value types for flags whose bad values would otherwise fail late, silently or with a traceback.

`float("nan")` parses, compares false with everything and slips past `<= 0` checks; a port above 65535 wraps
around inside gRPC. These types refuse such values when the command line is parsed, with argparse's one-line error.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def bounded(
    kind: type[int] | type[float], low: float, high: float = math.inf, above: bool = False
) -> Callable[[str], int | float]:
    """A finite `kind` within [low, high]; `above` excludes `low` itself."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not (math.isfinite(value) and (low < value if above else low <= value) and value <= high):
            lower = f"above {_shown(low)}" if above else f"at least {_shown(low)}"
            upper = "" if math.isinf(high) else f" and at most {_shown(high)}"
            raise argparse.ArgumentTypeError(f"must be {lower}{upper}, got '{text}'")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def _shown(bound: float) -> str:
    """Whole bounds in full (4294967295, not 4.29497e+09)."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


PORT = bounded(int, 0, 65535)
POSITIVE = bounded(float, 0.0, above=True)
NON_NEGATIVE = bounded(float, 0.0)
