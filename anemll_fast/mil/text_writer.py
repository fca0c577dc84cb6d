"""Write a Program as a compiled-model directory: model.mil text, weights/weight.bin, metadata.json.

Turns a loaded .mlpackage into an equivalent .mlmodelc layout on any OS (coremlc itself only runs
on macOS), so the text path can be tested against the protobuf path, and users can produce
.mlmodelc-style directories for the reference backend.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List

import numpy as np

from anemll_fast.mil.blobfile import BlobRef, BlobWriter
from anemll_fast.mil.errors import MilError
from anemll_fast.mil.program import (
    NUMPY_DTYPES, SUB_BYTE_BITS, FeatureSpec, Function, Op, OtherType, Program, TensorType, Value,
)

WEIGHT_REF = "@model_path/weights/weight.bin"
INLINE_MAX = 16  # const tensors with more elements go to the weight file
_OPSETS = {"CoreML5": "ios15", "CoreML6": "ios16", "CoreML7": "ios17", "CoreML8": "ios18", "CoreML9": "ios26"}


def _float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x).hex()


def _scalar(v: Any, dtype: str) -> str:
    if dtype == "bool":
        return "true" if bool(v) else "false"
    if dtype == "string":
        return json.dumps(str(v))
    if dtype in ("fp16", "fp32", "fp64", "bf16"):
        return _float(float(v))
    return str(int(v))


def _nested(arr: np.ndarray, dtype: str) -> str:
    if arr.ndim == 0:
        return _scalar(arr.item(), dtype)
    return "[" + ", ".join(_nested(a, dtype) for a in arr) + "]"


def _py_literal(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _float(float(v))
    if isinstance(v, dict):
        return "{" + ", ".join("{" + _py_literal(k) + ", " + _py_literal(x) + "}" for k, x in v.items()) + "}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_py_literal(x) for x in v) + ")"
    if isinstance(v, (list, np.ndarray)):
        return "[" + ", ".join(_py_literal(x) for x in list(v)) + "]"
    raise MilError(f"cannot write value {v!r} as model.mil text")


class _Writer:
    def __init__(self, program: Program):
        self.program = program
        self.blobs = BlobWriter()

    def value(self, val: Value, allow_blob: bool) -> str:
        t = val.type
        if isinstance(t, OtherType):
            text = t.text
            if "<" not in text:  # protobuf kind name only: spell out the dict<string, string> we hold
                if not (isinstance(val.data, dict) and all(isinstance(x, str) for kv in val.data.items() for x in kv)):
                    raise MilError(f"cannot write a {text} value as model.mil text")
                text = "dict<string, string>"
            return f"{text}({_py_literal(val.data)})"
        if not isinstance(t, TensorType):
            raise MilError(f"cannot write a value of type {t}")
        data = val.data
        if t.dtype == "string":
            if t.shape == ():
                return f"string({json.dumps(str(data))})"
            return f"{t}({_py_literal(list(np.asarray(data).reshape(-1)))})"
        if isinstance(data, BlobRef):  # unread weights (structure only) are written as zeros
            data = np.zeros(data.shape, dtype=NUMPY_DTYPES[data.dtype])
        arr = np.asarray(data)
        if t.shape == ():
            return f"{t.dtype}({_scalar(arr.reshape(()).item(), t.dtype)})"
        if allow_blob and (arr.size > INLINE_MAX or t.dtype in SUB_BYTE_BITS) and t.dtype != "bool":
            off = self.blobs.add(np.ascontiguousarray(arr), t.dtype)
            return f'{t}(BLOBFILE(path = string("{WEIGHT_REF}"), offset = uint64({off})))'
        return f"{t}({_nested(arr, t.dtype)})"

    def attrs(self, attrs: Dict[str, Value], allow_blob: bool = False) -> str:
        parts = [f"{k} = {self.value(v, allow_blob)}" for k, v in attrs.items()]
        return "[" + ", ".join(parts) + "]" if parts else ""

    def op(self, op: Op) -> str:
        if op.blocks:
            # Core ML's compiled text form of nested blocks is not known here: refuse rather than guess.
            raise MilError(f"cannot write op {op.type} ({op.name}) with control-flow blocks as model.mil text")
        lhs = ", ".join(f"{v.type} {v.name}" for v in op.outputs)
        args = []
        for pname, binds in op.inputs.items():
            items = [b if isinstance(b, str) else self.value(b, allow_blob=False) for b in binds]
            variadic = len(items) != 1 or (pname == "values" and op.type in ("concat", "stack"))
            args.append(f"{pname} = " + ("(" + ", ".join(items) + ")" if variadic else items[0]))
        attrs = dict(op.attributes)
        if "name" not in attrs and op.name:
            attrs["name"] = Value(TensorType("string", ()), op.name)
        text = f"{op.type}({', '.join(args)}){self.attrs(attrs, allow_blob=op.type == 'const' or op.type.startswith('constexpr_'))};"
        return f"{lhs} = {text}" if lhs else text

    def function(self, fn: Function) -> List[str]:
        opset = _OPSETS.get(fn.opset, fn.opset or "ios18")
        params = ", ".join(f"{v.type} {v.name}" for v in fn.inputs)
        lines = [f"    func {fn.name}<{opset}>({params}){(' ' + self.attrs(fn.attributes)) if fn.attributes else ''} {{"]
        lines += ["        " + self.op(op) for op in fn.ops]
        lines.append(f"    }} -> ({', '.join(fn.outputs)});")
        return lines

    def text(self) -> str:
        p = self.program
        version = p.version if p.version and p.version != "1" else "1.3"
        head = [f"program({version})"]
        attrs = {k: v for k, v in p.attributes.items() if isinstance(v.type, OtherType) and isinstance(v.data, dict)}
        if attrs:
            head.append(self.attrs(attrs))
        head.append("{")
        body: List[str] = []
        for fn in p.functions.values():
            body += self.function(fn)
        return "\n".join(head + body + ["}"]) + "\n"


def _schema(spec: FeatureSpec) -> Dict[str, Any]:
    d: Dict[str, Any] = {"name": spec.name, "dataType": spec.dtype,
                         "shape": json.dumps([(-1 if x is None else x) for x in spec.shape])}
    if spec.enumerated:
        d["enumeratedShapes"] = json.dumps([list(s) for s in spec.enumerated])
    if spec.ranges is not None:
        d["shapeRange"] = json.dumps([list(r) for r in spec.ranges])
    return d


def write_mlmodelc(program: Program, out_dir: str) -> str:
    """Write `program` as an .mlmodelc-style directory; returns out_dir."""
    w = _Writer(program)
    text = w.text()
    os.makedirs(os.path.join(out_dir, "weights"), exist_ok=True)
    with open(os.path.join(out_dir, "model.mil"), "w", encoding="utf-8") as f:
        f.write(text)
    w.blobs.write(os.path.join(out_dir, "weights", "weight.bin"))
    functions = []
    for name in program.functions:
        spec = program.function_spec(name)
        functions.append({"name": name, "inputSchema": [_schema(s) for s in spec.inputs],
                          "outputSchema": [_schema(s) for s in spec.outputs],
                          "stateSchema": [_schema(s) for s in spec.states]})
    meta = [{"defaultFunctionName": program.default_function, "functions": functions,
             "userDefinedMetadata": dict(program.metadata),
             "generatedBy": "anemll_fast.mil.text_writer"}]
    with open(os.path.join(out_dir, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def program_to_text(program: Program) -> str:
    """model.mil text only (constants that would go to a weight file are written inline)."""
    return _InlineWriter(program).text()


class _InlineWriter(_Writer):
    def value(self, val: Value, allow_blob: bool) -> str:
        return super().value(val, False)
