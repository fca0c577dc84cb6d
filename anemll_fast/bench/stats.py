"""One benchmark figure: its samples (one per repetition, warm-up excluded) and their min/median/max.

Every figure is a distribution, never a single timing: a figure whose samples spread by more than
NOISY_SPREAD of its median (or that has fewer than MIN_SAMPLES) is flagged noisy, so that a reader (and
`--compare`) does not trust a ratio the run itself could not resolve. With many samples (per-step times)
the spread is that of the central 80%: one step preempted by another process must not flag thousands.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

# (max - min) / median above this flags a figure as noisy. Decode steps on a quiet machine vary by a few
# percent; a busy 2-core machine easily doubles a step now and then, which is what this catches.
NOISY_SPREAD = 0.5
MIN_SAMPLES = 3
ROBUST_FROM = 10  # samples from which the spread is the 10th to 90th percentile's

HIGHER, LOWER = "higher", "lower"  # which way is better


@dataclass
class Figure:
    """A measured quantity. `id` is stable across runs (compare matches on it): group/what/params."""

    id: str
    group: str
    label: str
    unit: str
    better: str
    samples: List[float]
    params: Dict[str, Any] = field(default_factory=dict)
    # Measured once by design (load time, peak memory): n = 1 is not noise.
    single: bool = False

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"{self.id}: a figure needs at least one sample")
        if self.better not in (HIGHER, LOWER):
            raise ValueError(f"{self.id}: better must be {HIGHER!r} or {LOWER!r}")
        self.samples = [float(x) for x in self.samples]

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        m = self.median
        if not m:
            return 0.0
        if len(self.samples) >= ROBUST_FROM:
            lo, hi = np.percentile(self.samples, [10, 90])
            return float(hi - lo) / abs(m)
        return (self.max - self.min) / abs(m)

    @property
    def noisy(self) -> bool:
        if self.single and len(self.samples) == 1:
            return False
        return len(self.samples) < MIN_SAMPLES or self.spread > NOISY_SPREAD

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "group": self.group, "label": self.label, "unit": self.unit, "better": self.better,
                "params": self.params, "n": len(self.samples), "min": self.min, "median": self.median,
                "max": self.max, "noisy": self.noisy, "samples": self.samples}


def rates(ns: Sequence[int], items: float = 1.0) -> List[float]:
    """Items per second of each duration in nanoseconds."""
    return [items * 1e9 / max(int(x), 1) for x in ns]


def millis(ns: Sequence[int]) -> List[float]:
    return [int(x) / 1e6 for x in ns]


def micros(ns: Sequence[int]) -> List[float]:
    return [int(x) / 1e3 for x in ns]


def interleaved(sides: Dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Runs each side once per round, in turn, `warmup` rounds discarded: machine noise hits every side alike.
    Each callable returns its own measurement of the round."""
    out: Dict[str, List[float]] = {name: [] for name in sides}
    for r in range(warmup + rounds):
        for name, fn in sides.items():
            value = fn()
            if r >= warmup:
                out[name].append(value)
    return out
