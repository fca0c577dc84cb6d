"""Model files opened by the drop-in, loaded once per process and shared by every model object.

ANEMLL's runners open each FFN chunk once per function (prefill, infer, and more in 0.3.5), so the
same file is constructed several times. A `LoadedFile` holds what all of those share: the model
description (the protobuf spec of an .mlpackage, or one built from an .mlmodelc's model.mil and
metadata.json) and the backend's loaded program with its decoded weights (its runners: reference.py,
native.py). Entries are keyed by the
file's real path and the identity (size, mtime, inode) of every file inside it, so a model rewritten
in place is loaded afresh, and they are held weakly: they go when the last model object using them does.
"""
from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

from anemll_fast.mil.program import Program

BACKEND_ENV = "ANEMLL_FAST_BACKEND"
BACKENDS = ("reference", "coreml")

# coremltools.ComputeUnit member name -> the native backend's compute units.
COMPUTE_UNITS = {"ALL": "all", "CPU_ONLY": "cpu_only", "CPU_AND_GPU": "cpu_and_gpu", "CPU_AND_NE": "cpu_and_ne"}


def backend_name() -> str:
    """The backend the drop-in runs on: `$ANEMLL_FAST_BACKEND`, else the native Core ML backend
    when this build has it (macOS), else the reference backend."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    native = _native_coreml_available()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {list(BACKENDS)}")
        if forced == "coreml" and not native:
            raise RuntimeError(f"{BACKEND_ENV}=coreml: this build of anemll_fast has no Core ML backend "
                               f"(it needs macOS); use {BACKEND_ENV}=reference")
        return forced
    return "coreml" if native else "reference"


def _native_coreml_available() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        from anemll_fast import _native
    except ImportError:
        return False
    return bool(_native.build_info().get("coreml_backend"))


def identity(path: str) -> Tuple[Tuple[str, int, int, int], ...]:
    """(relative path, size, mtime_ns, inode) of every file of a model directory: cheap (a few stats)
    and changes whenever a file is rewritten or replaced."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class LoadedFile:
    """One model file as loaded for one backend (and, natively, one compute-units setting)."""

    def __init__(self, path: str, backend: str, compute_units: str):
        self.path = path
        self.backend = backend
        self.compute_units = compute_units
        self.compiled = os.path.isfile(os.path.join(path, "model.mil"))
        self._lock = threading.RLock()
        self._functions: Dict[str, Any] = {}
        self._program: Optional[Program] = None
        self.spec = self._read_spec()
        if self.spec is None:  # an .mlmodelc: its description comes from its program
            from anemll_fast.coreml_compat.description import spec_from_program

            self.spec = spec_from_program(self.program, self.path)

    @property
    def program(self) -> Program:
        """The loaded program, on first use (MLModel(..., skip_model_load=True) never needs it)."""
        with self._lock:
            if self._program is None:
                self._program = self._load_program()
            return self._program

    # -- description
    def _read_spec(self) -> Any:
        """The .mlpackage's protobuf, parsed once: it describes the model and holds its program."""
        from anemll_fast.mil.proto_loader import find_root_model, parse_spec

        if self.compiled:
            return None  # built from the program once it is loaded (see __init__)
        model_file, self._model_dir = find_root_model(self.path)
        return parse_spec(model_file)

    def _load_program(self) -> Program:
        from anemll_fast.mil.loader import load_program
        from anemll_fast.mil.plan import check_supported
        from anemll_fast.mil.proto_loader import program_from_spec

        weights = self.backend == "reference"  # Core ML runs the model itself: the interface suffices
        if self.spec is not None:
            program = program_from_spec(self.spec, self._model_dir, source=self.path, read_weights=weights)
        else:
            program = load_program(self.path, read_weights=weights)
        if weights:
            check_supported(program)  # a gap shows at construction, as Core ML's load errors do
        return program

    @property
    def function_names(self) -> List[str]:
        functions = self.spec.description.functions
        return [f.name for f in functions] if len(functions) else ["main"]

    @property
    def default_function(self) -> str:
        return self.spec.description.defaultFunctionName if self.multifunction else "main"

    @property
    def multifunction(self) -> bool:
        return len(self.spec.description.functions) > 0

    # -- backend objects
    def function(self, name: Optional[str]) -> Any:
        """The backend's runner of function `name` (None or "": the default), made once and shared."""
        key = name or self.default_function
        with self._lock:
            runner = self._functions.get(key)
            if runner is None:
                runner = self._make_runner(key)
                self._functions[key] = runner
            return runner

    def _make_runner(self, name: str) -> Any:
        program = self.program
        fn = name if self.multifunction else program.default_function  # "main" names the only function
        if self.backend == "reference":
            from anemll_fast.backends.reference import ReferenceModel
            from anemll_fast.coreml_compat.reference import ReferenceFunction

            first = next(iter(self._functions.values()), None)
            if first is not None:  # same program: the decoded weights and compiled plans are shared
                return ReferenceFunction(first.model.function(fn))
            return ReferenceFunction(ReferenceModel(program, fn))
        from anemll_fast.coreml_compat.native import NativeFunction

        # Core ML is told a function name only for multifunction models, as coremltools does.
        return NativeFunction(native_backend(self.compute_units), self.path, fn if self.multifunction else None,
                              program)


_CACHE: "weakref.WeakValueDictionary[Tuple[Any, ...], LoadedFile]" = weakref.WeakValueDictionary()
_CACHE_LOCK = threading.Lock()
_NATIVE_BACKENDS: Dict[str, Any] = {}


def open_file(path: str, backend: str, compute_units: str) -> LoadedFile:
    """The shared LoadedFile of `path` (an existing directory), loading it on first use."""
    real = os.path.realpath(path)
    key = (backend, compute_units if backend == "coreml" else "", real, identity(real))
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            entry = LoadedFile(real, backend, compute_units)
            _CACHE[key] = entry
        return entry


def cached_files() -> List[str]:
    """Paths of the files currently loaded (for tests and diagnostics)."""
    with _CACHE_LOCK:
        return [k[2] for k in _CACHE.keys()]


def native_backend(compute_units: str) -> Any:
    """One native Core ML backend per compute-units setting, shared by every model of the process
    (its compiled-model cache and state checks span files)."""
    with _CACHE_LOCK:
        be = _NATIVE_BACKENDS.get(compute_units)
        if be is None:
            from anemll_fast import _native

            be = _native.CoreMLBackend(compute_units)
            _NATIVE_BACKENDS[compute_units] = be
        return be
