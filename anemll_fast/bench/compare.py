"""`--compare previous.json`: the ratio of each figure's median to the same figure (same id) of an earlier
run, oriented so that > 1 is always better (a time's ratio is old/new, a rate's new/old). A ratio below
1 - tolerance is a regression, flagged; figures noisy in either run are marked so and never flagged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from anemll_fast.bench.stats import HIGHER

TOLERANCE = 0.10


@dataclass
class Ratio:
    id: str
    label: str
    old: float
    new: float
    ratio: float  # > 1: better now
    noisy: bool
    regression: bool


def compare(new: Dict[str, Any], old: Dict[str, Any], tolerance: float = TOLERANCE) -> List[Ratio]:
    """Ratios of the figures both documents hold, in the new document's order."""
    before = {f["id"]: f for f in old["figures"]}
    out: List[Ratio] = []
    for f in new["figures"]:
        o = before.get(f["id"])
        if o is None or o["median"] <= 0 or f["median"] <= 0:
            continue
        ratio = f["median"] / o["median"] if f["better"] == HIGHER else o["median"] / f["median"]
        noisy = bool(f["noisy"] or o["noisy"])
        out.append(Ratio(f["id"], f["label"], o["median"], f["median"], ratio, noisy,
                         regression=not noisy and ratio < 1.0 - tolerance))
    return out


def summary(ratios: List[Ratio], old_created: str = "") -> str:
    lines = [f"against the run of {old_created or 'the earlier file'}: ratio > 1 is better now "
             f"(! regression beyond {TOLERANCE:.0%}, ~ noisy in either run)"]
    width = max((len(r.label) for r in ratios), default=10)
    for r in ratios:
        mark = "!" if r.regression else ("~" if r.noisy else " ")
        lines.append(f"  {r.label:{width}s} {mark} {r.ratio:6.2f}x   ({r.old:.4g} -> {r.new:.4g})")
    n = sum(r.regression for r in ratios)
    lines.append(f"{n} regression(s) among {len(ratios)} figures compared")
    return "\n".join(lines)
