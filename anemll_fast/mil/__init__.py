"""MIL (Core ML ML Program) support: load .mlpackage / .mlmodelc into one IR, write model.mil text."""
from anemll_fast.mil.errors import (
    MilError, MilFormatError, MilInputError, MilRuntimeError, StateSpecError, UnsupportedOpError,
    WeightFileError,
)
from anemll_fast.mil.loader import load_program, op_histogram
from anemll_fast.mil.program import Function, Op, Program, TensorType, StateType, Value, Var

__all__ = [
    "load_program", "op_histogram", "Program", "Function", "Op", "Var", "Value", "TensorType",
    "StateType", "MilError", "MilFormatError", "WeightFileError", "UnsupportedOpError",
    "MilInputError", "StateSpecError", "MilRuntimeError",
]
