"""Read the declared interface of a Core ML model file without running it.

For each function of a `.mlpackage` (protobuf spec, read with coremltools'
proto classes) or a compiled `.mlmodelc` (`model.mil` signatures plus
`metadata.json`): inputs, outputs and states with shapes and dtypes, the
default function, and the user metadata.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from anemll_fast.config import TensorSpec, canonical_dtype
from anemll_fast.errors import ConfigError

MODEL_SUFFIXES = (".mlpackage", ".mlmodelc")


@dataclass
class FunctionIO:
    name: str
    inputs: Dict[str, TensorSpec] = field(default_factory=dict)
    outputs: Dict[str, TensorSpec] = field(default_factory=dict)
    states: Dict[str, TensorSpec] = field(default_factory=dict)


@dataclass
class ModelIO:
    path: Path
    format: str  # "mlpackage" | "mlmodelc"
    functions: Dict[str, FunctionIO]
    default_function: str
    metadata: Dict[str, str] = field(default_factory=dict)
    multifunction: bool = False

    def function(self, name: Optional[str] = None) -> FunctionIO:
        key = self.default_function if name is None else name
        if key not in self.functions:
            raise ConfigError(
                f"{self.path}: no function {key!r} (has {', '.join(self.functions)})"
            )
        return self.functions[key]


def read_model_io(path: Union[str, Path]) -> ModelIO:
    """Interface of a `.mlpackage` or `.mlmodelc` directory.

    The files are read by the MIL loader (anemll_fast.mil), without weights:
    one reader of the protobuf and of model.mil text for the whole package.
    """
    from anemll_fast.mil import MilError
    from anemll_fast.program_cache import load_program

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    if path.suffix not in MODEL_SUFFIXES:
        raise ConfigError(f"{str(path)!r} is not a Core ML model (expected .mlpackage or .mlmodelc)")
    try:
        program = load_program(str(path), read_weights=False)
    except MilError as exc:
        raise ConfigError(str(exc)) from None
    defaults = _default_shapes(path) if path.suffix == ".mlmodelc" else {}
    functions: Dict[str, FunctionIO] = {}
    for name in program.functions:
        where = f"{path.name}:{name}"
        spec = program.function_spec(name)
        # Outputs the description leaves open take their dims from the program.
        outputs = list(spec.outputs)
        if any(not f.shape for f in outputs):  # the signature walks every op: only when needed
            typed = {f.name: f for f in program.signature_spec(name).outputs}
            outputs = [typed.get(f.name, f) if not f.shape else f for f in outputs]
        fio = FunctionIO(
            name=name,
            inputs={f.name: _feature_to_spec(f, f"{where}.inputs", defaults.get(f.name)) for f in spec.inputs},
            outputs={f.name: _feature_to_spec(f, f"{where}.outputs") for f in outputs},
            states={f.name: _feature_to_spec(f, f"{where}.states") for f in spec.states},
        )
        for label, specs in (("inputs", fio.inputs), ("states", fio.states)):
            for tname, tspec in specs.items():
                if not tspec.shape:
                    raise ConfigError(f"{where}.{label}.{tname}: shape is flexible and not given anywhere")
        _resolve_outputs(fio, {f.name: tuple(f.shape) for f in outputs if not f.shape or None in f.shape},
                         f"{where}.outputs")
        functions[name] = fio
    names = list(functions)
    return ModelIO(
        path=path,
        format=path.suffix[1:],
        functions=functions,
        default_function=program.default_function,
        metadata=dict(program.metadata),
        multifunction=len(functions) > 1 or names != ["main"],
    )


def _resolve_outputs(
    fio: FunctionIO, dims_of: Dict[str, Tuple[Optional[int], ...]], where: str
) -> None:
    """Give shapes to outputs left open by flexible inputs.

    `dims_of` holds each open output's dims (None where unknown); unknown dims
    follow the one flexible input (e.g. embeddings [1, S] -> [1, S, H]).
    """
    flexible = [s for s in fio.inputs.values() if s.enumerated_shapes]
    for name, dims in dims_of.items():
        spec = fio.outputs[name]
        if not dims:
            raise ConfigError(f"{where}.{name}: output shape is not declared")
        shapes: List[Tuple[int, ...]] = []
        if None not in dims:
            shapes.append(tuple(int(d) for d in dims))  # type: ignore[arg-type]
        elif len(flexible) == 1:
            for in_shape in flexible[0].all_shapes:
                shapes.append(tuple(
                    d if d is not None else in_shape[min(i, len(in_shape) - 1)]
                    for i, d in enumerate(dims)
                ))
        else:
            raise ConfigError(f"{where}.{name}: output shape {list(dims)} cannot be resolved")
        spec.shape = shapes[0]
        spec.enumerated_shapes = tuple(shapes) if len(shapes) > 1 else ()


# -------------------------------------------------------------------- compiled
def _feature_to_spec(feature: Any, where: str, default_shape: Optional[Tuple[int, ...]] = None) -> TensorSpec:
    """A MIL FeatureSpec (dims None where flexible) as a TensorSpec."""
    dtype = canonical_dtype(feature.dtype, f"{where}.{feature.name}.data_type")
    enumerated = tuple(tuple(int(d) for d in e) for e in (feature.enumerated or ()))
    shape: Tuple[int, ...] = ()
    if None not in feature.shape:
        shape = tuple(int(d) for d in feature.shape)
    elif default_shape and len(default_shape) == len(feature.shape):
        shape = default_shape
    elif enumerated:
        shape = max(enumerated)
    elif feature.ranges:
        shape = tuple(int(lo) for lo, _ in feature.ranges)
    return TensorSpec(name=feature.name, shape=shape, data_type=dtype, enumerated_shapes=enumerated)


def _default_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Default input shapes metadata.json records (the signature has `?` there)."""
    try:
        raw = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    info = raw[0] if isinstance(raw, list) and raw and isinstance(raw[0], dict) else raw
    out: Dict[str, Tuple[int, ...]] = {}
    if isinstance(info, dict):
        for entry in info.get("inputSchema") or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                dims = re.findall(r"\d+", str(entry.get("shape", "")))
                if dims:
                    out[entry["name"]] = tuple(int(d) for d in dims)
    return out
