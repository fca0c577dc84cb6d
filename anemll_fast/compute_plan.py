"""Where Core ML runs each part of a model: MLComputePlan (macOS 14.4+) per part and function.

`compute_plan(config)` asks Core ML, through the native backend, how many operations of every function each
device would run and how the estimated cost splits between the Neural Engine, the GPU and the CPU.
`placement_warnings` names the parts whose cost is mostly off the Neural Engine; `load` warns with them.
Core ML's estimate is all there is to go on: a virtual machine without a Neural Engine plans on the CPU.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from anemll_fast.errors import AnemllError

DEVICES = ("neural_engine", "gpu", "cpu")
_DEVICE_NAMES = {"neural_engine": "Neural Engine", "gpu": "GPU", "cpu": "CPU"}
# Below this share of a part's estimated cost on the Neural Engine, `load` warns.
DEFAULT_THRESHOLD = 0.5

# (path, function or None, compute_units) -> {"functions": {name: {"ops": {...}, "cost": {...}}}}
PlanFn = Callable[[str, Optional[str], str], Dict[str, Any]]


class ComputePlanUnavailable(AnemllError):
    """MLComputePlan cannot run here (not macOS 14.4+, or a build without the Core ML backend)."""


class PlacementWarning(UserWarning):
    """Under cpu_and_ne, most of a part's estimated cost is not on the Neural Engine."""


@dataclass(frozen=True)
class FunctionPlacement:
    """One function of one part: operations per device and Core ML's estimated cost per device."""

    part: str  # component label: embeddings, ffn_infer[0], lm_head...
    file: str
    function: str
    ops: Dict[str, int]
    cost: Dict[str, float]

    @property
    def cost_share(self) -> Dict[str, float]:
        """Share of the estimated cost per device (empty when Core ML estimated none)."""
        total = sum(self.cost.get(d, 0.0) for d in DEVICES)
        return {d: self.cost.get(d, 0.0) / total for d in DEVICES} if total > 0 else {}

    @property
    def neural_engine_share(self) -> Optional[float]:
        share = self.cost_share
        return share["neural_engine"] if share else None


@dataclass
class ComputePlan:
    compute_units: str
    functions: List[FunctionPlacement] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"compute_units": self.compute_units,
                "functions": [dict(asdict(f), cost_share=f.cost_share) for f in self.functions]}

    def format(self) -> str:
        lines = [f"compute plan ({self.compute_units}): operations per device, share of Core ML's estimated cost"]
        for f in self.functions:
            ops = ", ".join(f"{_DEVICE_NAMES[d]} {f.ops.get(d, 0)}" for d in DEVICES)
            unassigned = f.ops.get("unassigned", 0)
            share = f.cost_share
            cost = (", ".join(f"{_DEVICE_NAMES[d]} {share[d]:.0%}" for d in DEVICES) if share
                    else "no estimate")
            lines.append(f"  {f.part:<16} {f.file} [{f.function}]")
            lines.append(f"    ops   {ops}{f', unassigned {unassigned}' if unassigned else ''}")
            lines.append(f"    cost  {cost}")
        return "\n".join(lines)


def requirement_error() -> Optional[str]:
    """Why MLComputePlan cannot run here, or None."""
    need = "the compute plan needs Core ML's MLComputePlan: macOS 14.4 or newer and anemll_fast's Core ML backend"
    if sys.platform != "darwin":
        return f"{need}; this is {platform.system() or sys.platform}"
    try:
        from anemll_fast import _native

        if not _native.build_info().get("coreml_backend"):
            return f"{need}; this build of anemll_fast has no Core ML backend"
    except ImportError:
        return f"{need}; the native extension anemll_fast._native is not built"
    release = platform.mac_ver()[0]
    try:
        parts = [int(x) for x in release.split(".")[:2]] + [0]
        if tuple(parts[:2]) < (14, 4):
            return f"{need}; this is macOS {release}"
    except ValueError:
        pass
    return None


def _native_plan(path: str, function: Optional[str], compute_units: str) -> Dict[str, Any]:
    from anemll_fast import _native

    try:
        return _native.coreml_compute_plan(path, function, compute_units)
    except RuntimeError as exc:
        raise ComputePlanUnavailable(str(exc)) from None


def compute_plan(config: Any, compute_units: str = "cpu_and_ne", *, plan_fn: Optional[PlanFn] = None) -> ComputePlan:
    """The compute plan of every part and function a ModelConfig uses (one Core ML plan per file).
    `plan_fn` replaces the native call (tests)."""
    if plan_fn is None:
        why = requirement_error()
        if why:
            raise ComputePlanUnavailable(why)
        plan_fn = _native_plan
    plans: Dict[str, Dict[str, Any]] = {}
    out = ComputePlan(compute_units)
    for label, comp in config.components():
        path = str(config.path_of(comp))
        if path not in plans:
            plans[path] = plan_fn(path, None, compute_units)
        functions = plans[path].get("functions", {})
        name = comp.function or (next(iter(functions)) if len(functions) == 1 else "main")
        if name not in functions:
            raise ComputePlanUnavailable(
                f"{label}: Core ML's plan of {path} has no function {name!r} (it has {sorted(functions)})")
        entry = functions[name]
        out.functions.append(FunctionPlacement(
            part=label, file=config.path_of(comp).name, function=name,
            ops={k: int(v) for k, v in entry.get("ops", {}).items()},
            cost={k: float(v) for k, v in entry.get("cost", {}).items()}))
    return out


def placement_warnings(plan: ComputePlan, threshold: float = DEFAULT_THRESHOLD) -> List[str]:
    """One message per part and function whose estimated cost is mostly off the Neural Engine."""
    out = []
    for f in plan.functions:
        share = f.cost_share
        if not share or share["neural_engine"] >= threshold:
            continue
        rest = ", ".join(f"{_DEVICE_NAMES[d]} {share[d]:.0%}" for d in ("gpu", "cpu") if share[d] > 0)
        out.append(f"{f.part} ({f.file}, function {f.function!r}): only {share['neural_engine']:.0%} of its "
                   f"estimated cost runs on the Neural Engine under {plan.compute_units} ({rest}); "
                   "see `anemll-fast inspect --compute-plan`")
    return out
