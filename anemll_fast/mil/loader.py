"""Load a Core ML model path (.mlpackage or compiled .mlmodelc) into a Program."""
from __future__ import annotations

import os
from typing import Dict

from anemll_fast.mil.errors import MilFormatError
from anemll_fast.mil.program import Program


def load_program(path: str, read_weights: bool = True) -> Program:
    """Read an .mlpackage (model.mlmodel protobuf) or .mlmodelc (model.mil text) directory.

    read_weights=False leaves weight blobs unread (BlobRef in place of arrays):
    structure only, fast; anemll_fast.program_cache reads them later."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MilFormatError(f"{path}: no such model directory (expected an .mlpackage or .mlmodelc)")
    if os.path.isfile(os.path.join(path, "model.mil")):
        from anemll_fast.mil.text_parser import load_mlmodelc

        return load_mlmodelc(path, read_weights)
    if os.path.isdir(os.path.join(path, "Data")) or os.path.isfile(os.path.join(path, "Manifest.json")):
        from anemll_fast.mil.proto_loader import load_mlpackage

        return load_mlpackage(path, read_weights)
    raise MilFormatError(f"{path}: neither an .mlpackage (Manifest.json, Data/) nor an .mlmodelc (model.mil)")


def op_histogram(path: str) -> Dict[str, Dict[str, int]]:
    """function name -> op type -> count, for an .mlpackage or .mlmodelc."""
    return load_program(path, read_weights=False).op_histogram()
