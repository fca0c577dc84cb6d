"""The model description of a compiled model (.mlmodelc), which carries no protobuf, as a Model_pb2:
what coremltools' description properties (`user_defined_metadata`, `input_description`, ...) read."""
from __future__ import annotations

from typing import Any, List

from anemll_fast.mil.program import FeatureSpec, Program

# Core ML ArrayFeatureType data types (FeatureTypes.proto) of MIL dtypes.
_ARRAY_TYPE = {"fp16": 65552, "fp32": 65568, "fp64": 65600, "int32": 131104, "int8": 131080}


def spec_from_program(program: Program, path: str) -> Any:
    """A Model_pb2 holding the description (inputs, outputs, states, functions, metadata) of a
    compiled model, which carries no protobuf: what coremltools' description properties read."""
    from coremltools.proto import Model_pb2

    from anemll_fast.mil.text_parser import _read_metadata

    meta = _read_metadata(path)
    spec = Model_pb2.Model()
    try:
        spec.specificationVersion = int(meta.get("specificationVersion", 9))
    except (TypeError, ValueError):
        spec.specificationVersion = 9
    desc = spec.description
    md = desc.metadata
    md.shortDescription = str(meta.get("shortDescription", "") or "")
    md.author = str(meta.get("author", "") or "")
    md.license = str(meta.get("license", "") or "")
    md.versionString = str(meta.get("version", "") or "")
    for k, v in program.metadata.items():
        md.userDefined[k] = v
    names = list(program.functions)
    if names == ["main"]:
        fs = program.function_spec("main")
        _fill(desc.input, fs.inputs)
        _fill(desc.output, fs.outputs)
        _fill(desc.state, fs.states, state=True)
    else:
        desc.defaultFunctionName = program.default_function
        for name in names:
            fs = program.function_spec(name)
            fd = desc.functions.add()
            fd.name = name
            _fill(fd.input, fs.inputs)
            _fill(fd.output, fs.outputs)
            _fill(fd.state, fs.states, state=True)
    return spec


def _fill(features: Any, specs: List[FeatureSpec], state: bool = False) -> None:
    for s in specs:
        fd = features.add()
        fd.name = s.name
        arr = fd.type.stateType.arrayType if state else fd.type.multiArrayType
        if s.dtype in _ARRAY_TYPE:
            arr.dataType = _ARRAY_TYPE[s.dtype]
        arr.shape.extend(int(d) if d is not None else 1 for d in s.shape)
        if not state and s.enumerated:
            for shape in s.enumerated:
                arr.enumeratedShapes.shapes.add().shape.extend(int(d) for d in shape)
