"""A drop-in for coremltools' `MLModel` and `CompiledMLModel`: scripts written for coremltools run
unchanged on anemll_fast (native Core ML on macOS, the reference backend elsewhere).

    python -m anemll_fast.coreml_compat SCRIPT.py [ARGS...]     # run a script with them in place
    undo = anemll_fast.patch_coremltools(); ...; undo()         # the same, in-process
    from anemll_fast.coreml_compat import MLModel, CompiledMLModel

`ANEMLL_FAST_BACKEND=reference|coreml` forces a backend.
"""
from anemll_fast.coreml_compat.models import CompiledMLModel, MLModel, MLState
from anemll_fast.coreml_compat.patch import Patch, patch_coremltools

__all__ = ["MLModel", "CompiledMLModel", "MLState", "Patch", "patch_coremltools"]
