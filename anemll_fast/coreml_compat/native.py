"""One function of a model file on a native backend (Core ML on macOS), called one prediction at a time.

Core ML is handed the caller's values without coremltools' detours: each input is copied once into
a buffer of the model's declared dtype that stays bound to the model (float16 given for a float16
input is a plain copy; coremltools widens it to float32 and Core ML narrows it back), and outputs are
written by Core ML into bound buffers, returned as one copy (float16 widened to float32, as
coremltools returns them). Buffers are bound once per set of input shapes (enumerated shapes, e.g.
embeddings at [1, 1] and [1, 64]).
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from anemll_fast.mil.program import NUMPY_DTYPES, FeatureSpec, Program


class NativeFunction:
    def __init__(self, backend: Any, path: str, function_name: Optional[str], program: Program):
        from anemll_fast import _native

        self.path = path
        self.function_name: str = function_name if function_name is not None else program.default_function
        spec = program.function_spec(self.function_name)
        self.input_specs: List[FeatureSpec] = spec.inputs
        self.output_specs: List[FeatureSpec] = _outputs_with_shapes(program, self.function_name, spec.outputs)
        self.state_specs: List[FeatureSpec] = _all_states(program)
        self._signature_inputs = program.signature_spec(self.function_name).inputs
        self._model = _native.NativeModel(backend, path, function_name)
        self._bindings: Dict[Tuple[Tuple[int, ...], ...], Tuple[Any, Dict[str, np.ndarray], Dict[str, np.ndarray]]] = {}
        self._lock = threading.Lock()  # the bound buffers are shared by every caller of this function

    def make_state(self) -> Any:
        return self._model.make_state()

    def read_state(self, state: Any, name: str) -> np.ndarray:
        spec = next(s for s in self.state_specs if s.name == name)
        return state.read(name, np.empty(tuple(int(d) for d in spec.shape), NUMPY_DTYPES[spec.dtype]))

    def write_state(self, state: Any, name: str, value: np.ndarray) -> None:
        spec = next(s for s in self.state_specs if s.name == name)
        state.write(name, np.ascontiguousarray(value, dtype=NUMPY_DTYPES[spec.dtype]))

    def predict(self, inputs: Dict[str, np.ndarray], state: Any = None) -> Dict[str, np.ndarray]:
        key = tuple(tuple(inputs[s.name].shape) for s in self.input_specs)
        with self._lock:
            entry = self._bindings.pop(key, None)
            if entry is None:
                if len(self._bindings) >= MAX_BINDINGS:  # range-flexible inputs: keep the recent shapes
                    del self._bindings[next(iter(self._bindings))]
                entry = self._bind(inputs)
            self._bindings[key] = entry  # most recently used last
            binding, in_bufs, out_bufs = entry
            for name, buf in in_bufs.items():
                np.copyto(buf, inputs[name], casting="unsafe")  # checked; cast here (fp32 given for fp16 rounds)
            binding.predict(state)
            return {name: (buf.astype(np.float32) if buf.dtype == np.float16 else buf.copy())
                    for name, buf in out_bufs.items()}

    def _bind(self, inputs: Dict[str, np.ndarray]) -> Tuple[Any, Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        in_bufs = {s.name: _page_aligned(inputs[s.name].shape, NUMPY_DTYPES[s.dtype]) for s in self.input_specs}
        sizes = self._flexible_sizes(inputs)
        out_bufs = {}
        for s in self.output_specs:
            shape = []
            for d in s.shape:
                if d is None:
                    if len(sizes) != 1:
                        raise NotImplementedError(
                            f"{self.path} ({self.function_name}): output {s.name!r} has a flexible shape "
                            f"{list(s.shape)} that the inputs do not determine (flexible input sizes: {sorted(sizes)})")
                    d = next(iter(sizes))
                shape.append(int(d))
            out_bufs[s.name] = _page_aligned(tuple(shape), NUMPY_DTYPES[s.dtype])
        return self._model.bind(in_bufs, out_bufs), in_bufs, out_bufs

    def _flexible_sizes(self, inputs: Dict[str, np.ndarray]) -> set:
        """Sizes the caller gave for the dims the function's signature leaves flexible: an output dim that
        is flexible takes that size when there is only one (ANEMLL's embeddings: the sequence length)."""
        sizes = set()
        for sig in self._signature_inputs:
            if sig.name in inputs:
                for d, given in zip(sig.shape, inputs[sig.name].shape):
                    if d is None:
                        sizes.add(int(given))
        return sizes


PAGE = 16384  # Apple silicon's page size
MAX_BINDINGS = 8  # per function; ANEMLL's models use one or two input shapes per function


def _page_aligned(shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros whose data starts on a page boundary: Core ML can then use the memory as it is rather
    than copying it into memory of its own (numpy alone aligns to 16 bytes)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + PAGE, np.uint8)
    start = (-raw.ctypes.data) % PAGE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _outputs_with_shapes(program: Program, name: str, outputs: List[FeatureSpec]) -> List[FeatureSpec]:
    """Declared outputs, their shapes from the function's signature where the description leaves them out."""
    signature = {s.name: s for s in program.signature_spec(name).outputs}
    out = []
    for s in outputs:
        sig = signature.get(s.name)
        if sig is not None and (not s.shape or any(d is None for d in s.shape)):
            s = FeatureSpec(s.name, s.dtype, sig.shape)
        out.append(s)
    return out


def _all_states(program: Program) -> List[FeatureSpec]:
    seen: Dict[str, FeatureSpec] = {}
    for fn in program.functions:
        for s in program.function_spec(fn).states:
            seen.setdefault(s.name, s)
    return list(seen.values())
