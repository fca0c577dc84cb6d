"""One function of a model file on the reference backend (any OS), with the calls the drop-in makes."""
from __future__ import annotations

import threading
from typing import Any, Dict, List

from anemll_fast.mil.program import NUMPY_DTYPES, FeatureSpec


class ReferenceFunction:
    """A reference-backend function with the calls the drop-in makes (states read and written by name)."""

    def __init__(self, model: Any):
        self.model = model
        self.function_name: str = model.function_name
        self.input_specs: List[FeatureSpec] = model.input_specs
        self.state_specs: List[FeatureSpec] = model.state_specs
        self.make_state = model.make_state
        self._lock = threading.Lock()  # a compiled plan runs one prediction at a time
        # The reference backend computes in float32: a value given wider than declared is rounded here,
        # as Core ML rounds it to the model's input type.
        self._narrow = {s.name: NUMPY_DTYPES[s.dtype] for s in self.input_specs if s.dtype in ("fp16", "fp32")}

    def predict(self, inputs: Dict[str, Any], state: Any = None) -> Dict[str, Any]:
        for name, dt in self._narrow.items():
            if inputs[name].dtype != dt:
                inputs[name] = inputs[name].astype(dt)
        with self._lock:
            return self.model.predict(inputs, state)

    @staticmethod
    def read_state(state: Any, name: str) -> Any:
        return state.read(name)

    @staticmethod
    def write_state(state: Any, name: str, value: Any) -> None:
        state.write(name, value)
