"""Helpers shared by the benchmark scripts (they run with bench/ on sys.path)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def save_result(result: dict[str, Any], out: str | None, prefix: str) -> Path:
    """Write a benchmark's JSON to `out`, or to bench/results/<prefix>-<unix time>.json."""
    path = Path(out) if out else Path(__file__).parent / "results" / f"{prefix}-{int(time.time())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


class Arrivals:
    """When a stream's pieces arrived: the first (perf_counter), and the longest wait between two
    consecutive ones (`gap`, seconds; 0 with fewer than two)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.gap = 0.0
        self._last = 0.0

    def mark(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gap = max(self.gap, now - self._last)
        self._last = now
