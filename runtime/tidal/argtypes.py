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
            lower = f"above {low:g}" if above else f"at least {low:g}"
            upper = "" if math.isinf(high) else f" and at most {high:g}"
            raise argparse.ArgumentTypeError(f"must be {lower}{upper}, got '{text}'")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


PORT = bounded(int, 0, 65535)
POSITIVE = bounded(float, 0.0, above=True)
NON_NEGATIVE = bounded(float, 0.0)
