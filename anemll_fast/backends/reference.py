"""The reference backend: run Core ML ML Programs (.mlpackage / .mlmodelc) on the CPU with numpy.

Usage mirrors coremltools' MLModel + MLState as ANEMLL uses them:

    model = ReferenceBackend.load("chunk_01of02.mlpackage", function_name="prefill")
    infer = model.function("infer")          # same file, same weights in memory
    state = model.make_state()               # shareable by every function and by other chunk files
    out = model.predict({"hidden_states": h, ...}, state)   # with identical state specs
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from anemll_fast.gc_pause import gc_paused
from anemll_fast.heap_trim import trim_if_grown
from anemll_fast.mil.errors import MilFormatError, MilInputError, StateSpecError
from anemll_fast.mil.ops.state import StateBuffer
from anemll_fast.mil.plan import Plan, check_supported, from_compute, to_compute
from anemll_fast.mil.program import NUMPY_DTYPES, FeatureSpec, Program

StateKey = Tuple[Tuple[str, Tuple[int, ...], str], ...]


class ReferenceState:
    """The mutable state tensors (e.g. a KV cache) of one model, like CoreML's MLState."""

    def __init__(self, specs: List[FeatureSpec], source: str = ""):
        self.source = source
        self.key: StateKey = state_key(specs)
        self.buffers: Dict[str, StateBuffer] = {}
        for s in specs:
            shape = tuple(int(d) for d in s.shape)
            dt = np.float32 if s.dtype in ("fp16", "fp32", "bf16") else NUMPY_DTYPES[s.dtype]
            self.buffers[s.name] = StateBuffer(s.name, s.dtype, shape, np.zeros(shape, dtype=dt))

    @property
    def names(self) -> List[str]:
        return list(self.buffers)

    def read(self, name: str) -> np.ndarray:
        """A copy of state `name` in its declared dtype."""
        return from_compute(self._buffer(name).array, self._buffer(name).dtype)

    def write(self, name: str, value: np.ndarray) -> None:
        buf = self._buffer(name)
        value = np.asarray(value)
        if value.shape != buf.shape:
            raise StateSpecError(f"state {name!r} has shape {list(buf.shape)}, got {list(value.shape)}")
        buf.array = to_compute(value.astype(NUMPY_DTYPES[buf.dtype]), buf.dtype)

    def reset(self) -> None:
        """Every state back to zeros, in the buffers it has: a fresh zeroed allocation of a KV cache comes
        from the system as untouched pages, which the next prefill's first writes then fault in one by
        one (SmolLM2-135M, context 512: ~1,100 faults, a few ms of a ~170 ms prefill), more than a memset."""
        for b in self.buffers.values():
            b.array.fill(0)

    def copy_from(self, other: "ReferenceState") -> None:
        """Each state from `other`'s state of the same name, over the leading part of each dimension both have
        (a KV cache moving to a longer or shorter context); the rest is zeroed."""
        for name, buf in self.buffers.items():
            src = other.buffers.get(name) if isinstance(other, ReferenceState) else None
            if src is None or len(src.shape) != len(buf.shape) or src.dtype != buf.dtype:
                raise StateSpecError(f"copy_state: state {name!r} {list(buf.shape)} {buf.dtype} has no counterpart "
                                     f"in the source state ({_describe(other.key) if src is None else ''}"
                                     f"{'' if src is None else f'{list(src.shape)} {src.dtype}'})")
            common = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, buf.shape))
            out = np.zeros_like(buf.array)
            out[common] = src.array[common]
            buf.array = out

    def _buffer(self, name: str) -> StateBuffer:
        if name not in self.buffers:
            raise StateSpecError(f"no state named {name!r}; this state holds {self.names}")
        return self.buffers[name]


def state_key(specs: List[FeatureSpec]) -> StateKey:
    return tuple(sorted((s.name, tuple(int(d) for d in s.shape), s.dtype) for s in specs))


def _describe(key: StateKey) -> str:
    return ", ".join(f"{n} {list(sh)} {dt}" for n, sh, dt in key) or "no states"


class ReferenceModel:
    """One function of a loaded program, compiled to a flat plan; see module docstring."""

    def __init__(self, program: Program, function_name: Optional[str] = None,
                 _cache: Optional[Dict[str, Any]] = None):
        self.program = program
        self.path = program.source
        self._cache = _cache if _cache is not None else {"consts": {}, "plans": {}}
        fn = program.function(function_name)
        self.function_name: str = fn.name
        plans = self._cache["plans"]
        if fn.name not in plans:
            if "fusion" not in self._cache:  # one reader of the program's fusion records per load
                from anemll_fast.program_cache import fusion_records

                self._cache["fusion"] = fusion_records(program)
            plans[fn.name] = Plan(program, fn.name, const_cache=self._cache["consts"],
                                  fusion_records=self._cache["fusion"])
        self._plan: Plan = plans[fn.name]
        spec = program.function_spec(fn.name)
        self.input_specs: List[FeatureSpec] = self._order(spec.inputs, self._plan.input_names, "input")
        self.output_specs: List[FeatureSpec] = spec.outputs
        self.state_specs: List[FeatureSpec] = self._model_states()
        self._state_key = state_key(self.state_specs)
        fn_states = {s.name for s in spec.states} | set(self._plan.state_names)
        self._uses_state = bool(fn_states)
        self._in_checks = [(s.name, s, NUMPY_DTYPES[s.dtype], s.dtype) for s in self.input_specs]

    # -- construction helpers
    def _order(self, specs: List[FeatureSpec], names: List[str], kind: str) -> List[FeatureSpec]:
        by_name = {s.name: s for s in specs}
        out = []
        for n, dt in zip(names, self._plan.input_dtypes):
            s = by_name.get(n)
            if s is None:  # described nowhere but in the signature
                sig = self.program.signature_spec(self.function_name)
                s = next(x for x in sig.inputs if x.name == n)
            out.append(s)
        return out

    def _model_states(self) -> List[FeatureSpec]:
        """Union of the states of every function: one state object serves all of them. This function's own
        specs come first, so that functions of other context sizes (infer_ctx{N}) get states of their size."""
        seen: Dict[str, FeatureSpec] = {}
        for name in [self.function_name] + [f for f in self.program.functions if f != self.function_name]:
            for s in self.program.function_spec(name).states:
                if any(d is None for d in s.shape) or s.dtype not in NUMPY_DTYPES or s.dtype == "string":
                    raise MilFormatError(f"{self.path}: function {name!r}: state {s.name!r} needs a static "
                                         f"shape and a numeric dtype, got {s.dtype} {list(s.shape)}")
                seen.setdefault(s.name, s)
        return list(seen.values())

    # -- public API
    @property
    def functions(self) -> List[str]:
        return list(self.program.functions)

    def function(self, name: str) -> "ReferenceModel":
        """Another function of the same file, sharing its decoded weights."""
        return ReferenceModel(self.program, name, self._cache)

    def stored_constants(self) -> List[Any]:
        """The constants this file's plans hold in stored form (fp16 or palettized weights), shared
        by all its functions: for diagnostics and for tests of what stays compressed."""
        return [entry[1] for entry in self._cache["consts"].values()]

    def make_state(self) -> ReferenceState:
        return ReferenceState(self.state_specs, self.path)

    def predict(self, inputs: Mapping[str, np.ndarray], state: Optional[ReferenceState] = None
                ) -> Dict[str, np.ndarray]:
        where = f"{self.path}: function {self.function_name!r}"
        if not isinstance(inputs, Mapping):
            raise MilInputError(f"{where}: inputs must be a dict of name -> array, got {type(inputs).__name__}")
        extra = set(inputs) - {c[0] for c in self._in_checks}
        if extra:
            raise MilInputError(f"{where}: unexpected input(s) {sorted(extra)}; "
                                f"expected {[c[0] for c in self._in_checks]}")
        arrays = []
        for name, spec, np_dt, dt in self._in_checks:
            if name not in inputs:
                raise MilInputError(f"{where}: missing input {name!r}")
            arrays.append(self._check_input(where, name, spec, np_dt, dt, inputs[name]))
        states: List[StateBuffer] = []
        if self._plan.state_names:
            if state is None:
                raise MilInputError(f"{where}: this function uses states {self._plan.state_names}; "
                                    f"pass state=model.make_state()")
            if not isinstance(state, ReferenceState):
                raise StateSpecError(f"{where}: state must come from make_state(), got {type(state).__name__}")
            if state.key != self._state_key:
                raise StateSpecError(
                    f"{where}: the state's spec ({_describe(state.key)}, made by {state.source}) differs from "
                    f"this model's ({_describe(self._state_key)})"
                )
            states = [state.buffers[n] for n in self._plan.state_names]
        elif state is not None and not isinstance(state, ReferenceState):
            raise StateSpecError(f"{where}: state must come from make_state(), got {type(state).__name__}")
        outs = self._plan.run(arrays, states)
        result = {n: from_compute(v, dt) for n, v, dt in
                  zip(self._plan.output_names, outs, self._plan.output_dtypes)}
        del outs
        trim_if_grown()  # a batch call's freed intermediates must not stay resident (heap_trim.py)
        return result

    @staticmethod
    def _check_input(where: str, name: str, spec: FeatureSpec, np_dt: Any, dt: str, value: Any) -> np.ndarray:
        arr = np.asarray(value)
        want_kind = np.dtype(np_dt).kind
        kind = arr.dtype.kind
        ok = (kind == want_kind or (want_kind in "iu" and kind in "iu"))
        if not ok:
            raise MilInputError(f"{where}: input {name!r} has dtype {arr.dtype}, expected {dt}")
        if not spec.accepts(tuple(arr.shape)):
            raise MilInputError(f"{where}: input {name!r} has shape {list(arr.shape)}, expected {spec.describe()}")
        if want_kind in "iu" and arr.dtype != np_dt and arr.size:
            info = np.iinfo(np_dt)
            if arr.min() < info.min or arr.max() > info.max:
                raise MilInputError(f"{where}: input {name!r} has values outside the range of {dt}")
        return to_compute(arr, dt)

    def __repr__(self) -> str:
        return f"ReferenceModel({os.path.basename(self.path)!r}, function={self.function_name!r})"


class ReferenceBackend:
    """Entry point: ReferenceBackend.load(path, function_name=None) -> ReferenceModel."""

    name = "reference"

    @staticmethod
    def load(path: str, function_name: Optional[str] = None) -> ReferenceModel:
        from anemll_fast.program_cache import load_program

        with gc_paused(freeze=True):  # see anemll_fast.gc_pause
            program = load_program(path)
            if not program.__dict__.get("_reference_supported"):  # once per loaded program
                check_supported(program)  # every function, so a gap shows at load, not mid-generation
                program.__dict__["_reference_supported"] = True
            # Loads of one file share its decoded constants (the program is shared while in use);
            # each load builds its own plans, so stateful ops (random_*) start afresh.
            consts = program.__dict__.setdefault("_reference_consts", {})
            return ReferenceModel(program, function_name, {"consts": consts, "plans": {}})


def load(path: str, function_name: Optional[str] = None) -> ReferenceModel:
    return ReferenceBackend.load(path, function_name)
