"""The words of each decision: what the controller saw and why it chose what it chose."""

from __future__ import annotations

import math

from tidal.control.api import Setpoint
from tidal.control.memory import Period
from tidal.control.plan import Plan


def why_down(variant: str, current: Plan | None) -> str:
    if current is None:
        return f"{variant or 'default'} is not allowed now"
    if current.max_batch == 0:
        return f"{variant} cannot meet the target even unloaded"
    predicted = "inf" if math.isinf(current.predicted_p99_ms) else f"{current.predicted_p99_ms:.1f}"
    return (
        f"{variant} cannot hold the SLO at the offered load "
        f"(utilisation {current.utilisation:.2f}, predicted p99 {predicted} ms)"
    )


def describe(why: str, plan: Plan, setpoint: Setpoint, p: Period) -> str:
    predicted = "inf" if math.isinf(plan.predicted_p99_ms) else f"{plan.predicted_p99_ms:.1f}"
    observed = "-" if p.p99 is None else f"{p.p99:.1f}"
    text = (
        f"{why}; {setpoint.variant or 'default'} max batch {setpoint.max_batch_size} "
        f"delay {setpoint.max_queue_delay_us} us; {p.request_rps:.0f} rps offered, utilisation "
        f"{plan.utilisation:.2f}, p99 predicted {predicted} ms / observed {observed} ms / SLO {p.slo_ms:g} ms; "
        f"batch {plan.line.intercept:.2f} + {plan.line.slope:.3f}/row ms, offset {plan.offset_ms:.1f} ms"
    )
    if setpoint.admission_limits:
        text += "; admit " + ", ".join(f"p{lv}<={n}" for lv, n in setpoint.admission_limits)
    return text
