"""When each request is sent: seeded gaps of a gamma process (Poisson at burstiness 1), or all at once."""

from __future__ import annotations

import math

import numpy as np


def arrival_gaps_s(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before sending each request, in order.

    Gaps are Gamma(shape=burstiness, scale=1 / (request_rate * burstiness)): mean 1 / request_rate for every
    burstiness; burstiness 1 is exponential (Poisson arrivals), < 1 burstier, > 1 more regular.
    request_rate = inf sends everything at once (all gaps 0).
    """
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 or inf, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    scale_s = 1.0 / (request_rate * burstiness)
    return [float(gap) for gap in rng.gamma(shape=burstiness, scale=scale_s, size=num_requests)]
