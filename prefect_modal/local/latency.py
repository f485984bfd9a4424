"""A Modal-like latency model for the local server: slow sandbox starts and RPC round trips.

The local server starts a sandbox in milliseconds; Modal starts a container.
Benchmarks and tests of the slow path (warm sandboxes, start-ahead) need the
real shape of that cost, so `LocalModal(latency="modal")` (or
`prefect-modal local serve --latency modal`) adds:

* to every sandbox start, a delay drawn from a log-normal distribution
  fitted to ComputeSDK's public sandbox leaderboard (April 2026), which
  measured Modal's time from `create()` to a first command at median 2.66 s,
  p95 11.78 s and p99 22.39 s.  The median fixes mu = ln(2.66); sigma is the
  least-squares fit of the p95 and p99 in log space (0.912), which gives
  p95 11.9 s and p99 22.2 s.  A simulation of Modal, not a measurement of it.
  As on Modal, `create()` returns at once (the sandbox is scheduled: it has
  an id, takes stdin and can be terminated) and its command starts after the
  delay, so the time to a first output is what the figures describe;
* to every RPC, a round trip (default 30 ms, a client far from Modal's region).

Off by default.  Draws come from a seeded generator, so a benchmark run is
repeatable.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field

#: ComputeSDK sandbox leaderboard, April 2026, Modal: create -> first command (seconds).
MODAL_START_MEDIAN_S = 2.66
MODAL_START_P95_S = 11.78
MODAL_START_P99_S = 22.39
_Z95, _Z99 = 1.6448536269514722, 2.3263478740408408


def fitted_sigma(median: float, p95: float, p99: float) -> float:
    """Least-squares sigma of a log-normal with this median through its p95 and p99."""
    a, b = math.log(p95 / median), math.log(p99 / median)
    return (_Z95 * a + _Z99 * b) / (_Z95**2 + _Z99**2)


@dataclass
class LatencyModel:
    """Delays the local server adds: a start delay per sandbox, a round trip per RPC."""

    start_median_s: float = MODAL_START_MEDIAN_S
    start_sigma: float = field(
        default_factory=lambda: fitted_sigma(
            MODAL_START_MEDIAN_S, MODAL_START_P95_S, MODAL_START_P99_S
        )
    )
    rpc_round_trip_s: float = 0.03
    #: no start takes longer than this (Modal's create would have failed by then)
    start_cap_s: float = 60.0
    seed: int = 13

    def __post_init__(self) -> None:
        if self.start_median_s < 0 or self.start_sigma < 0 or self.rpc_round_trip_s < 0:
            raise ValueError(f"latency model values must be 0 or more, not {self!r}")
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()

    def start_delay(self) -> float:
        if self.start_median_s == 0:
            return 0.0
        with self._lock:
            draw = self._random.lognormvariate(math.log(self.start_median_s), self.start_sigma)
        return min(draw, self.start_cap_s)

    def quantile(self, q: float) -> float:
        """The model's start-delay quantile (for docs and checks)."""
        from statistics import NormalDist

        z = NormalDist().inv_cdf(q)
        return math.exp(math.log(self.start_median_s) + z * self.start_sigma)


#: Names `LocalModal(latency=...)` and `--latency` accept.
PRESETS = ("off", "modal")


def resolve(latency: str | LatencyModel | None) -> LatencyModel | None:
    """`None`/"off": no delays; "modal": the fitted model; or a `LatencyModel` as it is."""
    if latency is None or isinstance(latency, LatencyModel):
        return latency
    if latency == "off":
        return None
    if latency == "modal":
        return LatencyModel()
    raise ValueError(
        f"latency={latency!r} is not a latency model: use one of {', '.join(PRESETS)} "
        "or a prefect_modal.local.latency.LatencyModel"
    )
