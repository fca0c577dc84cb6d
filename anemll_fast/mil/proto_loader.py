""".mlpackage loader: reads the model.mlmodel protobuf (coremltools' generated classes) into our IR.

Only coremltools' protobuf message classes are used, never its MIL frontend: the spec is walked here.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from anemll_fast.mil.blobfile import BlobCache, BlobRef, resolve_blob_path, unpack_bits
from anemll_fast.mil.errors import MilFormatError
from anemll_fast.mil.program import (
    NUMPY_DTYPES, SUB_BYTE_BITS, Block, FeatureSpec, Function, FunctionSpec, Op, OtherType, Program,
    StateType, TensorType, Value, Var,
)

_PROTO_DTYPES = {
    1: "bool", 2: "string", 10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16",
    21: "int8", 22: "int16", 23: "int32", 24: "int64", 25: "int4",
    31: "uint8", 32: "uint16", 33: "uint32", 34: "uint64", 35: "uint4", 36: "uint2", 37: "uint1",
    38: "uint6", 39: "uint3",
}
_ARRAY_DTYPES = {65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8", 65552: "fp16"}


def find_root_model(package: str) -> Tuple[str, str]:
    """(path of the root model.mlmodel, directory @model_path refers to) of an .mlpackage."""
    manifest = os.path.join(package, "Manifest.json")
    data_dir = os.path.join(package, "Data")
    if os.path.isfile(manifest):
        try:
            with open(manifest, "r", encoding="utf-8") as f:
                man = json.load(f)
            root = man["rootModelIdentifier"]
            rel = man["itemInfoEntries"][root]["path"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MilFormatError(f"{manifest}: cannot find the root model ({type(e).__name__}: {e})") from e
        model = os.path.join(data_dir, rel)
    else:
        model = os.path.join(data_dir, "com.apple.CoreML", "model.mlmodel")
    if not os.path.isfile(model):
        raise MilFormatError(f"{package}: model spec {model} does not exist")
    return model, os.path.dirname(model)


def parse_spec(model_file: str) -> Any:
    """The Model_pb2 protobuf in `model_file` (an .mlpackage's root model.mlmodel)."""
    from coremltools.proto import Model_pb2  # imported lazily: protobuf classes only

    spec = Model_pb2.Model()
    try:
        with open(model_file, "rb") as f:
            spec.ParseFromString(f.read())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise MilFormatError(f"{model_file}: not a valid Core ML model protobuf ({type(e).__name__}: {e})") from e
    return spec


def load_mlpackage(path: str, read_weights: bool = True) -> Program:
    model_file, model_dir = find_root_model(path)
    return program_from_spec(parse_spec(model_file), model_dir, source=path, read_weights=read_weights)


def program_from_spec(spec: Any, model_dir: str, source: str, read_weights: bool = True) -> Program:
    if not spec.HasField("mlProgram"):
        raise MilFormatError(f"{source}: not an ML Program (model type {spec.WhichOneof('Type')})")
    blobs = BlobCache()
    try:
        loader = _ProtoLoader(blobs, model_dir, source)
        loader.read_weights = read_weights
        functions = {name: loader.function(name, fn) for name, fn in spec.mlProgram.functions.items()}
    finally:
        blobs.close()
    if not functions:
        raise MilFormatError(f"{source}: the ML Program has no functions")
    desc = spec.description
    default = desc.defaultFunctionName or ("main" if "main" in functions else sorted(functions)[0])
    if default not in functions:
        raise MilFormatError(f"{source}: default function {default!r} is not among {sorted(functions)}")
    specs: Dict[str, FunctionSpec] = {}
    if len(desc.functions):
        for fd in desc.functions:
            specs[fd.name] = _function_spec(fd, source)
    elif len(functions) == 1:
        specs[default] = _function_spec(desc, source)
    metadata = {k: v for k, v in desc.metadata.userDefined.items()}
    attrs = {k: _ProtoLoader(None, model_dir, source).value(v, f"program attribute {k}")
             for k, v in spec.mlProgram.attributes.items()}
    return Program(functions, default, source=source, version=str(spec.mlProgram.version),
                   attributes=attrs, specs=specs, metadata=metadata)


def _feature(fd: Any, source: str, state: bool = False) -> Optional[FeatureSpec]:
    t = fd.type
    if state:
        if t.WhichOneof("Type") != "stateType":
            return None
        arr = t.stateType.arrayType
    else:
        if t.WhichOneof("Type") != "multiArrayType":
            return None
        arr = t.multiArrayType
    dtype = _ARRAY_DTYPES.get(arr.dataType)
    if dtype is None:
        raise MilFormatError(f"{source}: feature {fd.name!r} has unsupported array dtype {arr.dataType}")
    shape: Tuple[Optional[int], ...] = tuple(int(d) for d in arr.shape)
    enumerated = ranges = None
    if not state:
        which = arr.WhichOneof("ShapeFlexibility")
        if which == "enumeratedShapes":
            enumerated = [tuple(int(d) for d in s.shape) for s in arr.enumeratedShapes.shapes]
        elif which == "shapeRange":
            ranges = [(int(r.lowerBound), int(r.upperBound)) for r in arr.shapeRange.sizeRanges]
        if enumerated or ranges:
            rank = len(enumerated[0]) if enumerated else len(ranges)
            shape = tuple(None for _ in range(rank)) if not shape else shape
    return FeatureSpec(fd.name, dtype, shape, enumerated, ranges)


def _function_spec(desc: Any, source: str) -> FunctionSpec:
    ins = [f for f in (_feature(d, source) for d in desc.input) if f is not None]
    outs = [f for f in (_feature(d, source) for d in desc.output) if f is not None]
    states = [f for f in (_feature(d, source, state=True) for d in desc.state) if f is not None]
    return FunctionSpec(ins, outs, states)


class _ProtoLoader:
    def __init__(self, blobs: Optional[BlobCache], model_dir: str, source: str):
        self.blobs = blobs
        self.model_dir = model_dir
        self.source = source
        self.read_weights = True

    def vtype(self, vt: Any, where: str) -> Any:
        which = vt.WhichOneof("type")
        if which == "tensorType":
            tt = vt.tensorType
            dtype = _PROTO_DTYPES.get(tt.dataType)
            if dtype is None:
                raise MilFormatError(f"{self.source}: {where}: unknown data type {tt.dataType}")
            dims = []
            for d in tt.dimensions:
                dims.append(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None)
            if tt.rank < 0:
                return TensorType(dtype, None)
            return TensorType(dtype, tuple(dims))
        if which == "stateType":
            inner = self.vtype(vt.stateType.wrappedType, where)
            if not isinstance(inner, TensorType):
                raise MilFormatError(f"{self.source}: {where}: state wraps a non-tensor type")
            return StateType(inner)
        return OtherType(str(which))

    def value(self, v: Any, where: str) -> Value:
        t = self.vtype(v.type, where)
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            if self.blobs is None or not isinstance(t, TensorType) or t.shape is None or None in t.shape:
                raise MilFormatError(f"{self.source}: {where}: weight blob without a static tensor type")
            path = resolve_blob_path(v.blobFileValue.fileName, self.model_dir, self.source)
            if not self.read_weights:
                return Value(t, BlobRef(path, int(v.blobFileValue.offset), t.dtype, tuple(t.shape)))
            return Value(t, self.blobs.reader(path).read(int(v.blobFileValue.offset), t.dtype,
                                                       tuple(t.shape), name=where))
        if which == "immediateValue":
            iv = v.immediateValue
            kind = iv.WhichOneof("value")
            if kind == "tensor":
                if not isinstance(t, TensorType):
                    raise MilFormatError(f"{self.source}: {where}: tensor value with type {t}")
                return Value(t, self.tensor(iv.tensor, t, where))
            if kind == "list":
                return Value(t, [self.value(x, where).data for x in iv.list.values])
            if kind == "tuple":
                return Value(t, tuple(self.value(x, where).data for x in iv.tuple.values))
            if kind == "dictionary":
                return Value(t, {self._key(e.key, where): self.value(e.value, where).data
                                 for e in iv.dictionary.values})
        raise MilFormatError(f"{self.source}: {where}: value has no content")

    def _key(self, v: Any, where: str) -> Any:
        k = self.value(v, where).data
        return k.item() if isinstance(k, np.ndarray) and k.ndim == 0 else k

    def tensor(self, tv: Any, t: TensorType, where: str) -> np.ndarray:
        if t.shape is None or None in t.shape:
            raise MilFormatError(f"{self.source}: {where}: constant with unknown shape")
        shape = tuple(t.shape)
        count = int(np.prod(shape)) if shape else 1
        dt = t.dtype
        field = tv.WhichOneof("value")
        try:
            if field == "bytes":
                raw = np.frombuffer(tv.bytes.values, dtype=np.uint8)
                if dt in SUB_BYTE_BITS:
                    vals = unpack_bits(raw, SUB_BYTE_BITS[dt], count)
                    if dt == "int4":
                        vals = ((vals.astype(np.int16) ^ 8) - 8).astype(np.int8)
                    arr = vals
                elif dt == "fp16":
                    arr = raw.view("<f2").astype(np.float16)
                elif dt == "bf16":
                    arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = raw.view(np.dtype(NUMPY_DTYPES[dt]).newbyteorder("<")).astype(NUMPY_DTYPES[dt])
            elif field == "strings":
                vals = [s.decode("utf-8") if isinstance(s, bytes) else s for s in tv.strings.values]
                if not shape:
                    if len(vals) != 1:
                        raise ValueError(f"{len(vals)} strings for a scalar")
                    return vals[0]
                arr = np.array(vals, dtype=object)
            elif field is None:
                arr = np.zeros(0, dtype=NUMPY_DTYPES[dt])
            else:
                src = getattr(tv, field).values
                arr = np.array(list(src), dtype=NUMPY_DTYPES[dt] if dt != "bool" else np.bool_)
            if arr.size != count:
                raise ValueError(f"holds {arr.size} values, type {t} needs {count}")
            return arr.reshape(shape)
        except (ValueError, TypeError) as e:
            raise MilFormatError(f"{self.source}: {where}: bad immediate tensor ({e})") from e

    def function(self, name: str, fn: Any) -> Function:
        where = f"function {name!r}"
        opset = fn.opset
        if opset not in fn.block_specializations:
            if len(fn.block_specializations) != 1:
                raise MilFormatError(f"{self.source}: {where}: no block for opset {opset!r}")
            opset = next(iter(fn.block_specializations))
        block = fn.block_specializations[opset]
        inputs = [Var(i.name, self.vtype(i.type, f"{where} input {i.name}")) for i in fn.inputs]
        ops = [self.op(o, f"{where}") for o in block.operations]
        attrs = {k: self.value(v, f"{where} attribute {k}") for k, v in fn.attributes.items()}
        return Function(name, inputs, ops, list(block.outputs), opset=opset, attributes=attrs)

    def op(self, o: Any, where: str) -> Op:
        outs = [Var(v.name, self.vtype(v.type, f"{where} op {o.type} output {v.name}")) for v in o.outputs]
        label = f"{where}, op {o.type} ({outs[0].name if outs else '?'})"
        blocks = [Block([Var(i.name, self.vtype(i.type, f"{label} block input {i.name}")) for i in b.inputs],
                        [self.op(x, f"{label} block {k}") for k, x in enumerate(b.operations)],
                        list(b.outputs))
                  for b in o.blocks]
        inputs: Dict[str, List[Any]] = {}
        for pname, arg in o.inputs.items():
            binds: List[Any] = []
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    binds.append(b.name)
                else:
                    binds.append(self.value(b.value, f"{label} input {pname}"))
            inputs[pname] = binds
        attrs = {k: self.value(v, f"{label} attribute {k}") for k, v in o.attributes.items()}
        name_attr = attrs.get("name")
        op_name = name_attr.data if name_attr is not None and isinstance(name_attr.data, str) else ""
        return Op(o.type, inputs, outs, attrs, op_name, blocks)
