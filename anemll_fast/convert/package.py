"""Turn MIL programs into saved .mlpackage files: conversion, LUT palettization, multifunction merge, metadata."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

from anemll_fast.convert.errors import ConvertError

PALETTIZE_MODES = ("uniform", "kmeans")
LUT_BITS = (1, 2, 3, 4, 6, 8)
LUT_GROUP_SIZE = 8  # output channels sharing one LUT, ANEMLL's default "per_channel" value
_MIN_PALETTIZED_ELEMENTS = 1024


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence coremltools' pass-pipeline progress bars and its off-macOS warnings (we draw our own progress)."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def program_to_model(prog, inputs=None):
    """ct.convert a MIL program to an iOS18 mlprogram without compiling it (Core ML is absent off macOS).

    The default optimization pipeline is skipped: our graphs are already fp16 and minimal, the passes would only
    cost time (they dominate conversion time) and could rewrite ops outside the interpreter's vocabulary.
    """
    import coremltools as ct

    with quiet():
        return ct.convert(
            prog,
            pass_pipeline=ct.PassPipeline.EMPTY,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            compute_units=ct.ComputeUnit.CPU_AND_NE,
            skip_model_load=True,
            inputs=inputs,
        )


def palettize(prog, nbits: Optional[int], op_type: str, mode: str = "uniform"):
    """LUT-palettize, in place, the weights of every `op_type` op of a MIL program (conv for projections,
    gather for embeddings), per function and before any multifunction merge.

    Restricting by op type keeps RoPE tables, norms and biases in fp16. Applied to the MIL program rather than
    through cto.coreml.palettize_weights(MLModel): same pass, without a protobuf round trip and re-conversion.
    """
    if not nbits:
        return prog
    import coremltools.optimize as cto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    op_cfg = cto.coreml.OpPalettizerConfig(
        mode=mode,
        nbits=int(nbits),
        granularity="per_grouped_channel",
        group_size=LUT_GROUP_SIZE,
        weight_threshold=_MIN_PALETTIZED_ELEMENTS,
        num_kmeans_workers=1,
    )
    config = cto.coreml.OptimizationConfig(op_type_configs={op_type: op_cfg})
    pass_ = PASS_REGISTRY["compression::palettize_weights"]
    pass_.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    with quiet():
        pass_.apply(prog)
    return prog


def save_model(model, path: Path) -> None:
    with quiet():
        model.save(str(path))


def merge_functions(functions: Mapping[str, Path], out_path: Path, default: str) -> None:
    """Merge single-function packages into one multifunction package (weights deduplicated across functions)."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for target, src in functions.items():
        desc.add_function(str(src), src_function_name="main", target_function_name=target)
    desc.default_function_name = default
    with quiet():
        ct.utils.save_multifunction(desc, str(out_path))


def spec_path(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "model.mlmodel"


def load_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path(package).read_bytes())
    return spec


def write_metadata(package: Path, *, author: str, version: str, short_description: str,
                   user_defined: Dict[str, str]) -> None:
    """Rewrite the package's model description metadata in place.

    Done on the protobuf directly because save_multifunction drops metadata and MLModel.save cannot overwrite
    the package it was loaded from.
    """
    spec = load_spec(package)
    meta = spec.description.metadata
    meta.author = author
    meta.versionString = version
    meta.shortDescription = short_description
    for key, value in user_defined.items():
        meta.userDefined[key] = str(value)
    tmp = spec_path(package).with_suffix(".tmp")
    tmp.write_bytes(spec.SerializeToString())
    os.replace(tmp, spec_path(package))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def check_palettize_args(nbits: Optional[int], field: str, mode: str) -> None:
    if nbits is not None and nbits not in LUT_BITS:
        raise ConvertError(f"{field} must be one of {LUT_BITS} bits (or none), got {nbits!r}")
    if mode not in PALETTIZE_MODES:
        raise ConvertError(f"palettize_mode must be one of {PALETTIZE_MODES}, got {mode!r}")
