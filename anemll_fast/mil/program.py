"""In-memory MIL program: Program -> Function -> Op, with typed Vars and constant Values.

Both loaders (protobuf .mlpackage and model.mil text) produce this IR; the plan compiler and the
text writer consume it. Constant tensors are held in their storage numpy dtype; sub-byte integer
types (uint1..uint6, int4) are held unpacked, one element per uint8/int8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

# MIL dtype name -> numpy storage dtype (sub-byte types are unpacked into one byte each).
NUMPY_DTYPES: Dict[str, Any] = {
    "bool": np.bool_,
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "bf16": np.float32,  # numpy has no bfloat16: held widened, rounded to bf16 on output
    "int4": np.int8,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint1": np.uint8,
    "uint2": np.uint8,
    "uint3": np.uint8,
    "uint4": np.uint8,
    "uint6": np.uint8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "string": object,
}
FLOAT_DTYPES = frozenset({"fp16", "fp32", "fp64", "bf16"})
SUB_BYTE_BITS = {"uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6, "int4": 4}

Dim = Optional[int]  # None: a flexible (unknown) dimension


@dataclass(frozen=True)
class TensorType:
    """tensor<dtype, shape>; shape None means unknown rank, a None dim is flexible. Rank 0 = scalar."""

    dtype: str
    shape: Optional[Tuple[Dim, ...]]

    def __str__(self) -> str:
        if self.shape is None:
            return f"tensor<{self.dtype}, ?>"
        if self.shape == ():
            return self.dtype  # scalars: `fp16 x`, as coremlc writes them
        return f"tensor<{self.dtype}, {list_str(self.shape)}>"


@dataclass(frozen=True)
class StateType:
    """state<tensor<...>>: a mutable buffer owned by the caller's state object."""

    wrapped: TensorType

    def __str__(self) -> str:
        return f"state<{self.wrapped}>"


@dataclass(frozen=True)
class OtherType:
    """list / tuple / dict types: carried along for attributes, never computed on."""

    text: str

    def __str__(self) -> str:
        return self.text


VarType = Union[TensorType, StateType, OtherType]


def list_str(shape: Tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass
class Value:
    """A constant: numpy array in storage dtype (or a str / nested python value) plus its MIL type."""

    type: VarType
    data: Any

    @property
    def dtype(self) -> str:
        return self.type.dtype if isinstance(self.type, TensorType) else ""


@dataclass
class Var:
    name: str
    type: VarType


# An op argument: a variable name or an inline constant; variadic parameters hold several.
Binding = Union[str, Value]


@dataclass
class Block:
    """A nested block of a control-flow op (cond branches, while_loop condition and body)."""

    inputs: List[Var]
    ops: List["Op"]
    outputs: List[str]


@dataclass
class Op:
    type: str
    inputs: Dict[str, List[Binding]]
    outputs: List[Var]
    attributes: Dict[str, Value] = field(default_factory=dict)
    name: str = ""
    blocks: List[Block] = field(default_factory=list)

    def const_value(self) -> Optional[Value]:
        """The value of a `const` op (stored as its `val` attribute), else None."""
        return self.attributes.get("val") if self.type == "const" else None


@dataclass
class Function:
    name: str
    inputs: List[Var]
    ops: List[Op]
    outputs: List[str]
    opset: str = ""
    attributes: Dict[str, Value] = field(default_factory=dict)

    def op_histogram(self) -> Dict[str, int]:
        hist: Dict[str, int] = {}
        for op in self.ops:
            hist[op.type] = hist.get(op.type, 0) + 1
        return hist


@dataclass
class FeatureSpec:
    """A declared model input/output/state: dtype, default shape and flexibility."""

    name: str
    dtype: str
    shape: Tuple[Dim, ...]
    enumerated: Optional[List[Tuple[int, ...]]] = None
    ranges: Optional[List[Tuple[int, int]]] = None  # per dim (lower, upper); upper -1: unbounded

    def accepts(self, shape: Tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        if self.enumerated:
            return tuple(shape) in {tuple(s) for s in self.enumerated}
        for i, (d, want) in enumerate(zip(shape, self.shape)):
            if self.ranges is not None:
                lo, hi = self.ranges[i]
                if d < lo or (hi >= 0 and d > hi):
                    return False
            elif want is not None and d != want:
                return False
        return True

    def describe(self) -> str:
        if self.enumerated:
            return "one of " + ", ".join(str(list(s)) for s in self.enumerated)
        if self.ranges is not None:
            return "[" + ", ".join(f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in self.ranges) + "]"
        return list_str(self.shape)


@dataclass
class FunctionSpec:
    inputs: List[FeatureSpec]
    outputs: List[FeatureSpec]
    states: List[FeatureSpec]


@dataclass
class Program:
    functions: Dict[str, Function]
    default_function: str
    source: str = ""  # the file it was loaded from, for error messages
    version: str = "1"
    attributes: Dict[str, Value] = field(default_factory=dict)
    specs: Dict[str, FunctionSpec] = field(default_factory=dict)  # per function, from the model description
    metadata: Dict[str, str] = field(default_factory=dict)

    def function(self, name: Optional[str] = None) -> Function:
        from anemll_fast.mil.errors import MilError

        key = self.default_function if name is None else name
        if key not in self.functions:
            raise MilError(
                f"{self.source}: no function {key!r}; the program has {sorted(self.functions)}"
            )
        return self.functions[key]

    def op_histogram(self) -> Dict[str, Dict[str, int]]:
        return {name: fn.op_histogram() for name, fn in self.functions.items()}

    def function_spec(self, name: str) -> FunctionSpec:
        """Declared I/O of a function: from the model description, else from its signature."""
        if name in self.specs:
            return self.specs[name]
        return self.signature_spec(name)

    def signature_spec(self, name: str) -> FunctionSpec:
        """I/O as the function signature and its output var types declare them."""
        fn = self.functions[name]
        types = _var_types(fn)
        ins, states = [], []
        for v in fn.inputs:
            if isinstance(v.type, StateType):
                states.append(FeatureSpec(v.name, v.type.wrapped.dtype, tuple(v.type.wrapped.shape or ())))
            elif isinstance(v.type, TensorType):
                ins.append(FeatureSpec(v.name, v.type.dtype, tuple(v.type.shape or ())))
        outs = []
        for o in fn.outputs:
            t = types.get(o)
            if isinstance(t, TensorType):
                outs.append(FeatureSpec(o, t.dtype, tuple(t.shape or ())))
        return FunctionSpec(ins, outs, states)


def _var_types(fn: Function) -> Dict[str, VarType]:
    types: Dict[str, VarType] = {v.name: v.type for v in fn.inputs}
    for op in fn.ops:
        for v in op.outputs:
            types[v.name] = v.type
    return types
