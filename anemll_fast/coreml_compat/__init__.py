"""A drop-in for coremltools' `MLModel` and `CompiledMLModel`: scripts written for coremltools run
unchanged on anemll_fast (native Core ML on macOS, the reference backend elsewhere).

    python -m anemll_fast.coreml_compat SCRIPT.py [ARGS...]     # run a script with them in place
    undo = anemll_fast.patch_coremltools(); ...; undo()         # the same, in-process
    from anemll_fast.coreml_compat import MLModel, CompiledMLModel

`ANEMLL_FAST_BACKEND=reference|coreml` forces a backend.
"""
import importlib
from typing import Any

# Loaded on first use: coremltools takes seconds to import, and the entry point checks its
# arguments before it needs it.
_LAZY = {"MLModel": "models", "CompiledMLModel": "models", "MLState": "models",
         "Patch": "patch", "patch_coremltools": "patch"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'anemll_fast.coreml_compat' has no attribute {name!r}")
    return getattr(importlib.import_module(f"anemll_fast.coreml_compat.{_LAZY[name]}"), name)


__all__ = list(_LAZY)
