"""Put the drop-in classes where coremltools' users look them up, and take them out again."""
from __future__ import annotations

import importlib
from typing import Any, List, Tuple

# (module, attribute) pairs that name coremltools' MLModel / CompiledMLModel.
_TARGETS = (
    ("coremltools.models", "MLModel"),
    ("coremltools.models.model", "MLModel"),
    ("coremltools.models", "CompiledMLModel"),
    ("coremltools.models._compiled_model", "CompiledMLModel"),
)


class Patch:
    """Undo handle of patch_coremltools(): call it (or `undo()`, or leave its `with` block) to restore
    coremltools' own classes. Undoing twice is harmless."""

    def __init__(self, saved: List[Tuple[Any, str, Any]]):
        self._saved = saved

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def undo(self) -> None:
        saved, self._saved = self._saved, []
        for module, name, original in reversed(saved):
            setattr(module, name, original)

    __call__ = undo

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def patch_coremltools() -> Patch:
    """Replace `coremltools.models.MLModel` and `CompiledMLModel` with anemll_fast's drop-in for this
    process. Code that looks them up afterwards (`ct.models.MLModel(...)`, a later
    `from coremltools.models import MLModel`) gets the drop-in; names imported before keep coremltools'."""
    from anemll_fast.coreml_compat.models import CompiledMLModel, MLModel

    replacement = {"MLModel": MLModel, "CompiledMLModel": CompiledMLModel}
    saved = []
    for module_name, attr in _TARGETS:
        module = importlib.import_module(module_name)
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, replacement[attr])
    return Patch(saved)
