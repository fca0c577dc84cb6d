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
    """Interface of a `.mlpackage` or `.mlmodelc` directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".mlpackage":
        return _read_mlpackage(path)
    if path.suffix == ".mlmodelc":
        return _read_mlmodelc(path)
    raise ConfigError(f"{str(path)!r} is not a Core ML model (expected .mlpackage or .mlmodelc)")


# --------------------------------------------------------------------- package
def mlpackage_spec_path(path: Path) -> Path:
    """The root model spec of a package, as its Manifest.json names it."""
    manifest = path / "Manifest.json"
    data_dir = path / "Data"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
            root = info["rootModelIdentifier"]
            rel = info["itemInfoEntries"][root]["path"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{manifest}: malformed package manifest ({exc!r})") from None
        spec = data_dir / rel
    else:
        spec = data_dir / "com.apple.CoreML" / "model.mlmodel"
    if not spec.is_file():
        raise ConfigError(f"{path}: package has no model spec at {spec}")
    return spec


def load_spec(path: Path) -> Any:
    """The parsed `Model` protobuf of a package."""
    from coremltools.proto import Model_pb2

    spec_path = mlpackage_spec_path(path)
    model = Model_pb2.Model()
    try:
        model.ParseFromString(spec_path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ConfigError(f"{spec_path}: cannot parse the model spec ({exc})") from None
    return model


def _array_spec(name: str, array: Any, where: str) -> TensorSpec:
    from coremltools.proto import FeatureTypes_pb2

    dtype_name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
    dtype = canonical_dtype(dtype_name, f"{where}.{name}.data_type")
    shape = tuple(int(d) for d in array.shape)
    enumerated: Tuple[Tuple[int, ...], ...] = ()
    which = array.WhichOneof("ShapeFlexibility")
    if which == "enumeratedShapes":
        enumerated = tuple(tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes)
    elif which == "shapeRange":
        # A range is reported by its bounds; the default shape stays the declared one.
        ranges = array.shapeRange.sizeRanges
        lower = tuple(int(r.lowerBound) for r in ranges)
        upper = tuple(int(r.upperBound) if r.upperBound > 0 else int(r.lowerBound) for r in ranges)
        enumerated = (lower, upper)
    if not shape and enumerated:
        shape = enumerated[0]
    return TensorSpec(name=name, shape=shape, data_type=dtype, enumerated_shapes=enumerated)


def _feature_specs(features: Any, where: str) -> Dict[str, TensorSpec]:
    out: Dict[str, TensorSpec] = {}
    for f in features:
        kind = f.type.WhichOneof("Type")
        if kind == "multiArrayType":
            out[f.name] = _array_spec(f.name, f.type.multiArrayType, where)
        elif kind == "stateType":
            out[f.name] = _array_spec(f.name, f.type.stateType.arrayType, where)
        else:
            raise ConfigError(f"{where}.{f.name}: unsupported feature type {kind!r}")
    return out


def _program_output_types(program_fn: Any) -> Dict[str, Tuple[Optional[str], Tuple[Optional[int], ...]]]:
    """dtype and dims (None where unknown) of the values a MIL function returns."""
    from coremltools.proto import MIL_pb2

    types: Dict[str, Tuple[Optional[str], Tuple[Optional[int], ...]]] = {}
    block = program_fn.block_specializations[program_fn.opset]
    wanted = set(block.outputs)
    for op in block.operations:
        for out in op.outputs:
            if out.name not in wanted:
                continue
            vt = out.type
            if vt.WhichOneof("type") != "tensorType":
                continue
            tt = vt.tensorType
            dims = tuple(
                int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None
                for d in tt.dimensions
            )
            types[out.name] = (MIL_pb2.DataType.Name(tt.dataType), dims)
    return types


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


def _fill_outputs(fio: FunctionIO, program_fn: Any, where: str) -> None:
    open_outputs = [n for n, s in fio.outputs.items() if not s.shape]
    if not open_outputs:
        return
    types = _program_output_types(program_fn) if program_fn is not None else {}
    _resolve_outputs(fio, {n: types.get(n, (None, ()))[1] for n in open_outputs}, where)


def _read_mlpackage(path: Path) -> ModelIO:
    spec = load_spec(path)
    desc = spec.description
    program = spec.mlProgram if spec.WhichOneof("Type") == "mlProgram" else None
    functions: Dict[str, FunctionIO] = {}
    if len(desc.functions):
        for fdesc in desc.functions:
            where = f"{path.name}:{fdesc.name}"
            fio = FunctionIO(
                name=fdesc.name,
                inputs=_feature_specs(fdesc.input, f"{where}.inputs"),
                outputs=_feature_specs(fdesc.output, f"{where}.outputs"),
                states=_feature_specs(fdesc.state, f"{where}.states"),
            )
            prog_fn = program.functions[fdesc.name] if program is not None and fdesc.name in program.functions else None
            _fill_outputs(fio, prog_fn, f"{where}.outputs")
            functions[fdesc.name] = fio
        default = desc.defaultFunctionName or next(iter(functions))
        multifunction = True
    else:
        where = f"{path.name}:main"
        fio = FunctionIO(
            name="main",
            inputs=_feature_specs(desc.input, f"{where}.inputs"),
            outputs=_feature_specs(desc.output, f"{where}.outputs"),
            states=_feature_specs(desc.state, f"{where}.states"),
        )
        prog_fn = program.functions["main"] if program is not None and "main" in program.functions else None
        _fill_outputs(fio, prog_fn, f"{where}.outputs")
        functions["main"] = fio
        default = "main"
        multifunction = False
    if default not in functions:
        raise ConfigError(f"{path}: default function {default!r} is not among {list(functions)}")
    return ModelIO(
        path=path,
        format="mlpackage",
        functions=functions,
        default_function=default,
        metadata=dict(desc.metadata.userDefined),
        multifunction=multifunction,
    )


# -------------------------------------------------------------------- compiled
# `func infer<ios18>(tensor<fp16, [1, 1, 1024]> hidden_states, state<tensor<fp16, [...]>> kv) {`
_FUNC_RE = re.compile(r"\bfunc\s+([A-Za-z_][\w]*)\s*(?:<\s*\w+\s*>)?\s*\(", re.S)
_ARG_RE = re.compile(
    r"(state\s*<\s*)?tensor\s*<\s*(\w+)\s*,\s*\[([^\]]*)\]\s*>\s*(?:>\s*)?([A-Za-z_][\w]*)"
)
_RETURN_RE = re.compile(r"\}\s*->\s*\(([^)]*)\)\s*;")
_MIL_DTYPES = {
    "fp16": "FLOAT16", "fp32": "FLOAT32", "fp64": "FLOAT64", "int32": "INT32",
    "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}


def _mil_dtype(token: str, where: str) -> str:
    if token not in _MIL_DTYPES:
        raise ConfigError(f"{where}: unknown MIL data type {token!r}")
    return _MIL_DTYPES[token]


def _mil_dims(text: str) -> Tuple[Optional[int], ...]:
    """Dims of a MIL tensor type; None for symbolic ones (`?`, `is0`)."""
    toks = [t.strip() for t in text.split(",")]
    return tuple(int(t) if t.isdigit() else None for t in toks if t)


def _matching_paren(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ConfigError("model.mil: unbalanced parentheses in a function signature")


def mil_function_signatures(
    text: str, where: str = "model.mil"
) -> Tuple[Dict[str, FunctionIO], Dict[str, Dict[str, Tuple[Optional[int], ...]]]]:
    """Inputs, states and outputs of every function of a `model.mil` text.

    Only signatures and the declarations of returned values are read: this is
    an interface scan, not a parser of the program (that is anemll_fast.mil).
    Symbolic dims come back as shape () plus, in the second dict, their dims
    with None where unknown, to be resolved from metadata.json.
    """
    functions: Dict[str, FunctionIO] = {}
    open_dims: Dict[str, Dict[str, Tuple[Optional[int], ...]]] = {}
    matches = list(_FUNC_RE.finditer(text))
    if not matches:
        raise ConfigError(f"{where}: no function found")
    for idx, m in enumerate(matches):
        name = m.group(1)
        close = _matching_paren(text, m.end() - 1)
        fwhere = f"{where}:{name}"
        fio = FunctionIO(name=name)
        unresolved: Dict[str, Tuple[Optional[int], ...]] = {}
        for arg in _ARG_RE.finditer(text[m.end(): close]):
            is_state, dtype, dims_text, arg_name = arg.groups()
            dims = _mil_dims(dims_text)
            spec = TensorSpec(
                name=arg_name,
                shape=() if None in dims else dims,  # type: ignore[arg-type]
                data_type=_mil_dtype(dtype, f"{fwhere}.{arg_name}"),
            )
            if None in dims:
                unresolved[arg_name] = dims
            (fio.states if is_state else fio.inputs)[arg_name] = spec
        body_end = matches[idx + 1].start() if idx + 1 < len(matches) else len(text)
        body = text[close:body_end]
        ret = _RETURN_RE.search(body)
        if ret is None:
            raise ConfigError(f"{fwhere}: function has no return statement")
        for out_name in (n.strip() for n in ret.group(1).split(",")):
            if not out_name:
                continue
            decl = re.search(
                r"tensor\s*<\s*(\w+)\s*,\s*\[([^\]]*)\]\s*>\s+" + re.escape(out_name) + r"\s*=", body
            )
            if decl is None:
                raise ConfigError(f"{fwhere}: returned value {out_name!r} is never declared")
            dims = _mil_dims(decl.group(2))
            fio.outputs[out_name] = TensorSpec(
                name=out_name,
                shape=() if None in dims else dims,  # type: ignore[arg-type]
                data_type=_mil_dtype(decl.group(1), f"{fwhere}.{out_name}"),
            )
            if None in dims:
                unresolved[out_name] = dims
        functions[name] = fio
        open_dims[name] = unresolved
    return functions, open_dims


def _schema_enumerated(entry: Dict[str, Any]) -> Tuple[Tuple[int, ...], ...]:
    """Enumerated shapes from a metadata.json schema entry, when it lists them."""
    flex = entry.get("shapeFlexibility") or entry.get("enumeratedShapes")
    if not isinstance(flex, str):
        return ()
    shapes = []
    for part in flex.split("|"):
        if "..." in part:
            return ()  # a range ("1 x 1...2000"), not an enumeration
        dims = re.findall(r"\d+", part)
        if dims:
            shapes.append(tuple(int(d) for d in dims))
    return tuple(shapes)


def _read_mlmodelc(path: Path) -> ModelIO:
    mil_path = path / "model.mil"
    if not mil_path.is_file():
        raise ConfigError(f"{path}: compiled model has no model.mil")
    text = mil_path.read_text(encoding="utf-8", errors="replace")
    functions, open_dims = mil_function_signatures(text, str(mil_path))
    metadata: Dict[str, str] = {}
    default: Optional[str] = None
    meta_path = path / "metadata.json"
    if meta_path.is_file():
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{meta_path}: invalid JSON ({exc})") from None
        info = raw[0] if isinstance(raw, list) and raw else raw
        if not isinstance(info, dict):
            raise ConfigError(f"{meta_path}: expected a JSON object or a list of one")
        user = info.get("userDefinedMetadata") or {}
        metadata = {str(k): str(v) for k, v in user.items()} if isinstance(user, dict) else {}
        default = info.get("defaultFunctionName") or None
        # Enumerated input shapes are only in metadata.json (model.mil has the default).
        schemas = [(None, info)] + [
            (f.get("name"), f) for f in info.get("functions", []) if isinstance(f, dict)
        ]
        for fname, schema in schemas:
            for entry in schema.get("inputSchema", []) or []:
                if not isinstance(entry, dict):
                    continue
                shapes = _schema_enumerated(entry)
                targets = [functions[fname]] if fname in functions else (
                    list(functions.values()) if fname is None else []
                )
                for fio in targets:
                    spec = fio.inputs.get(entry.get("name", ""))
                    if spec is None:
                        continue
                    if shapes:
                        spec.enumerated_shapes = shapes
                    if not spec.shape:
                        default_shape = re.findall(r"\d+", str(entry.get("shape", "")))
                        spec.shape = tuple(int(d) for d in default_shape) or (shapes[0] if shapes else ())
    for fname, fio in functions.items():
        where = f"{mil_path}:{fname}"
        for name, spec in list(fio.inputs.items()) + list(fio.states.items()):
            if not spec.shape:
                raise ConfigError(f"{where}.{name}: shape is symbolic and metadata.json does not give it")
        outs = {n: d for n, d in open_dims[fname].items() if n in fio.outputs}
        _resolve_outputs(fio, outs, where)
    names = list(functions)
    if default is None:
        default = "main" if "main" in functions else ("infer" if "infer" in functions else names[0])
    if default not in functions:
        raise ConfigError(f"{meta_path}: default function {default!r} is not among {names}")
    return ModelIO(
        path=path,
        format="mlmodelc",
        functions=functions,
        default_function=default,
        metadata=metadata,
        multifunction=len(functions) > 1 or names != ["main"],
    )


# ------------------------------------------------------------------ op counts
# A statement `TYPE NAME = OP(...)[...]`: the op is the call after the first
# `=` of a line whose left side has no parenthesis (attributes come later).
_MIL_OP_RE = re.compile(r"^[^()=\n]*=\s*([A-Za-z_]\w*)\s*\(", re.M)


def op_histogram(path: Union[str, Path]) -> Dict[str, Dict[str, int]]:
    """{function: {op type: count}} of an ML Program, nested blocks included."""
    path = Path(path)
    if path.suffix == ".mlpackage":
        spec = load_spec(path)
        if spec.WhichOneof("Type") != "mlProgram":
            raise ConfigError(f"{path}: not an ML Program (model type {spec.WhichOneof('Type')!r})")
        out: Dict[str, Dict[str, int]] = {}
        for name, fn in spec.mlProgram.functions.items():
            counts: Dict[str, int] = {}
            _count_block(fn.block_specializations[fn.opset], counts)
            out[name] = dict(sorted(counts.items()))
        return out
    if path.suffix == ".mlmodelc":
        mil_path = path / "model.mil"
        if not mil_path.is_file():
            raise ConfigError(f"{path}: compiled model has no model.mil")
        text = mil_path.read_text(encoding="utf-8", errors="replace")
        matches = list(_FUNC_RE.finditer(text))
        out = {}
        for i, m in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            counts = {}
            for op in _MIL_OP_RE.findall(text[m.end():end]):
                counts[op] = counts.get(op, 0) + 1
            out[m.group(1)] = dict(sorted(counts.items()))
        return out
    raise ConfigError(f"{str(path)!r} is not a Core ML model (expected .mlpackage or .mlmodelc)")


def _count_block(block: Any, counts: Dict[str, int]) -> None:
    for op in block.operations:
        counts[op.type] = counts.get(op.type, 0) + 1
        for inner in op.blocks:
            _count_block(inner, counts)
