"""`MLModel`, `CompiledMLModel` and `MLState` with coremltools 9.0's semantics, run by anemll_fast.

They subclass coremltools' own classes, so `isinstance` checks, the description properties
(`user_defined_metadata`, `input_description`, `short_description`, ...) and attributes a caller
sets keep working; only loading, `predict`, `make_state` and the state's reads and writes are ours.
Every model of one file shares one loaded program (see `files`).
"""
from __future__ import annotations

import atexit
import copy
import errno
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from coremltools import ComputeUnit
from coremltools.models._compiled_model import CompiledMLModel as _CTCompiledMLModel
from coremltools.models.model import MLModel as _CTMLModel
from coremltools.models.model import MLState as _CTMLState
from coremltools.models.model import _FeatureDescription

from anemll_fast.coreml_compat import files
from anemll_fast.errors import AnemllError
from anemll_fast.mil.program import FLOAT_DTYPES, FeatureSpec

# What coremltools hands Core ML without complaint (its PybindCompatibleArray types; float16 it
# widens first). Anything else fails there with "value type not convertible".
_ARRAY_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32))


class _StateProxy:
    """The backend state behind an MLState: coremltools' MLState calls read_state/write_state on it."""

    def __init__(self, runner: Any, state: Any):
        self.runner = runner
        self.state = state
        self.specs: Dict[str, FeatureSpec] = {s.name: s for s in runner.state_specs}

    def _spec(self, name: Any) -> FeatureSpec:
        if name not in self.specs:
            raise RuntimeError(f"No state named {name!r}: this state holds {sorted(self.specs)}")
        return self.specs[name]

    def read_state(self, name: str) -> np.ndarray:
        spec = self._spec(name)
        value = self.runner.read_state(self.state, name)
        # Core ML hands fp16 buffers to Python as float32 (coremltools widens them).
        return value.astype(np.float32) if spec.dtype in ("fp16", "bf16") else value

    def write_state(self, name: str, value: Any) -> None:
        spec = self._spec(name)
        arr = _as_array(value)
        if arr is None or arr.dtype.kind not in "fiu":
            raise RuntimeError(f"Failed to write state {name!r}, only multi-array value is supported "
                               f"(got {type(value).__name__})")
        want = tuple(int(d) for d in spec.shape)
        if tuple(arr.shape) != want:
            raise RuntimeError(f"Failed to write state {name!r}: it has shape {list(want)}, "
                               f"the value has shape {list(arr.shape)}")
        self.runner.write_state(self.state, name, arr)


class MLState(_CTMLState):
    """A model's state (e.g. a KV cache), from make_state(); shareable by every function of the file and
    by other files whose state specs match, updated in place by predict."""

    def __repr__(self) -> str:
        return f"MLState({sorted(self.__proxy__.specs)})"


def _as_array(value: Any) -> Optional[np.ndarray]:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes, dict)) or value is None:
        return None
    detach = getattr(value, "detach", None)  # torch tensors, as coremltools converts them
    if callable(detach):
        value = detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception:
        return None


class _Runner:
    """What MLModel and CompiledMLModel share: one function of one loaded file, and the calls to it."""

    _loaded: Optional[files.LoadedFile]
    _runner: Any

    def _bind_function(self, loaded: files.LoadedFile, path: str, function_name: Optional[str],
                       compiled_api: bool) -> None:
        from anemll_fast.mil.errors import MilError

        self._loaded = loaded
        names = loaded.function_names
        if compiled_api and function_name and function_name not in names:
            raise RuntimeError(f"Error loading {path}: functionName {function_name!r} is not a function of "
                               f"this model; it has {names}")
        try:
            self._runner = loaded.function(function_name or None)
        except MilError as e:  # e.g. an op the reference backend lacks: reported at load, as Core ML does
            raise RuntimeError(f"Error loading {path}: {e}") from e
        self._where = f"{os.path.basename(path)} ({self._runner.function_name})"

    def _predict_one(self, data: Mapping[str, Any], state: Any, strict_names: bool) -> Dict[str, np.ndarray]:
        runner = self._runner
        if strict_names:
            self._verify_input_names(data)
        inputs = {}
        for spec in runner.input_specs:
            if spec.name not in data:
                raise RuntimeError(f"{self._where}: Feature {spec.name} is required but not specified.")
            inputs[spec.name] = _convert_input(self._where, spec, data[spec.name])
        backend_state = None
        if state is not None:
            if not isinstance(state, MLState):
                raise TypeError(f"{self._where}: state must come from make_state() of an anemll_fast model, "
                                f"got {type(state).__name__}")
            backend_state = state.__proxy__.state
        try:
            out = runner.predict(inputs, backend_state)
        except AnemllError as e:
            raise RuntimeError(f"{self._where}: {e}") from e
        return {name: (v.astype(np.float32) if v.dtype == np.float16 else v) for name, v in out.items()}

    def _verify_input_names(self, data: Mapping[str, Any]) -> None:
        names = {s.name for s in self._runner.input_specs}
        for given in data:
            if given not in names:
                raise KeyError(f'Provided key "{given}", in the input dict, does not match any of the model '
                               f"input name(s), which are: {sorted(names)} ({self._where})")

    def _predict(self, data: Any, state: Any, strict_names: bool) -> Any:
        _CTMLModel._check_predict_data(data)
        if self._runner is None:
            raise Exception("This model was loaded with skip_model_load=True: it cannot predict.")
        if isinstance(data, dict):
            return self._predict_one(data, state, strict_names)
        assert state is None, "State can only be used for unbatched predictions"
        return [self._predict_one(d, None, strict_names) for d in data]

    def _make_state(self) -> MLState:
        if self._runner is None:
            raise Exception("This model was not loaded with the Core ML Framework. Cannot get state.")
        try:
            return MLState(_StateProxy(self._runner, self._runner.make_state()))
        except AnemllError as e:
            raise RuntimeError(f"{self._where}: {e}") from e


def _convert_input(where: str, spec: FeatureSpec, value: Any) -> np.ndarray:
    """The array to run, checked as Core ML checks it: dtype convertible to the declared one, shape
    accepted. float16 given for a float16 input passes as is (no widening round trip)."""
    arr = _as_array(value)
    if arr is None:
        raise RuntimeError(f"{where}: input {spec.name!r}: value of type {type(value).__name__} is not "
                           f"convertible to a multi-array")
    if arr.dtype not in _ARRAY_DTYPES:
        raise RuntimeError(f"{where}: input {spec.name!r}: a {arr.dtype} array is not convertible; Core ML takes "
                           f"float16, float32, float64 or int32 arrays")
    floating = spec.dtype in FLOAT_DTYPES
    if floating != (arr.dtype.kind == "f"):
        raise RuntimeError(f"{where}: input {spec.name!r} is {spec.dtype}, got a {arr.dtype} array")
    if not spec.accepts(tuple(arr.shape)):
        raise RuntimeError(f"{where}: input {spec.name!r} has shape {list(arr.shape)}, but the model expects "
                           f"{spec.describe()}")
    return arr  # the backend runs it in the declared dtype (float32 given for fp16 is rounded)


def _check_compute_units(compute_units: Any, message: str) -> None:
    if not isinstance(compute_units, ComputeUnit):
        raise TypeError(message)


class MLModel(_Runner, _CTMLModel):
    """coremltools.models.MLModel for .mlpackage (and .mlmodelc) ML programs, run by anemll_fast.
    Other models (a single-file .mlmodel, a neural-network spec) are handed to coremltools' own class."""

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not _is_ml_program(model):
            return _CTMLModel(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: Any, is_temp_package: bool = False, mil_program: Any = None,
                 skip_model_load: bool = False, compute_units: ComputeUnit = ComputeUnit.ALL,
                 weights_dir: Optional[str] = None, function_name: Optional[str] = None,
                 optimization_hints: Optional[dict] = None) -> None:
        from coremltools import proto

        _check_compute_units(compute_units, '"compute_units" parameter must be of type: coremltools.ComputeUnit')
        if optimization_hints is not None and not isinstance(optimization_hints, dict):
            raise TypeError('"optimization_hints" must be a dictionary or None')
        self.compute_unit = compute_units
        self.function_name = function_name
        self.optimization_hints = dict(optimization_hints) if optimization_hints is not None else None
        self._mil_program = mil_program
        self.is_temp_package = False
        self._framework_error = None
        self.__proxy__ = None
        self._runner = None
        if isinstance(model, proto.Model_pb2.Model):
            model = self._package_from_spec(model, weights_dir)
        elif isinstance(model, (str, os.PathLike)):
            model = os.path.abspath(os.path.expanduser(os.path.expandvars(os.fspath(model))))
            self.is_temp_package = is_temp_package
        else:
            raise TypeError("Expected model to be a .mlmodel file, .mlpackage file or a Model_pb2 object")
        if not os.path.isdir(model):  # files went to coremltools' class (see __new__)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", model)
        self.is_package = True
        self.package_path = model
        self._weights_dir = _weights_dir(model)
        loaded = _open(model, compute_units)
        # Each model has its own small description (callers may edit metadata through it); the program
        # and weights stay shared in `loaded`.
        self._spec = proto.Model_pb2.Model()
        self._spec.specificationVersion = loaded.spec.specificationVersion
        self._spec.description.CopyFrom(loaded.spec.description)
        self._input_description = _FeatureDescription(self._spec.description.input)
        self._output_description = _FeatureDescription(self._spec.description.output)
        self._model_input_names_set = {i.name for i in self._spec.description.input}
        if self.is_temp_package:
            atexit.register(shutil.rmtree, model, True)
        default = self._spec.description.defaultFunctionName
        if self.function_name is None and default:
            self.function_name = default
        if self.function_name is not None:
            if not self._is_multifunction() and self.function_name != "main":
                raise ValueError('function_name must be "main" for non multifunction model')
            if self._is_multifunction():
                f = self._get_function_description(self.function_name)  # ValueError when absent
                self._model_input_names_set = {i.name for i in f.input}
        self._loaded = loaded
        self._where = os.path.basename(model)
        if not skip_model_load:
            self._bind_function(loaded, model, self.function_name, compiled_api=False)

    def _package_from_spec(self, spec: Any, weights_dir: Optional[str]) -> str:
        from coremltools.models.utils import _create_mlpackage

        if weights_dir is None:
            raise Exception("MLModel of type mlProgram cannot be loaded just from the model spec object. "
                            "It also needs the path to the weights file. Please provide that as well, "
                            "using the 'weights_dir' argument.")
        self.is_temp_package = True
        return _create_mlpackage(spec, weights_dir)

    def predict(self, data: Any, state: Optional[MLState] = None) -> Any:
        """Outputs of the model for `data` (a dict, or a list of dicts), updating `state` in place."""
        return self._predict(data, state, strict_names=True)

    def make_state(self) -> MLState:
        return self._make_state()

    def get_spec(self) -> Any:
        """A deep copy of the model's protobuf: the real one for an .mlpackage; for an .mlmodelc, which
        carries none, a spec holding the description only."""
        full = copy.deepcopy(self._loaded.spec)
        full.description.CopyFrom(self._spec.description)
        return full

    def save(self, save_path: str) -> None:
        from coremltools.models.utils import _get_model_spec_path, save_spec

        if self._loaded.compiled:
            raise RuntimeError(f"{self.package_path}: a compiled model (.mlmodelc) cannot be saved as a package")
        save_path = os.path.expanduser(save_path)
        if os.path.exists(save_path):
            shutil.rmtree(save_path)
        shutil.copytree(self.package_path, save_path)  # weights and manifest as they are
        save_spec(self.get_spec(), _get_model_spec_path(save_path))

    def get_compiled_model_path(self) -> str:
        if self._loaded.compiled:
            return self.package_path
        raise Exception("This model was not loaded or compiled with the Core ML Framework.")

    @property
    def load_duration_in_nano_seconds(self) -> Optional[int]:
        return None

    @property
    def last_predict_duration_in_nano_seconds(self) -> Optional[int]:
        return None


class CompiledMLModel(_Runner, _CTCompiledMLModel):
    """coremltools.models.CompiledMLModel (a compiled .mlmodelc, or an .mlpackage) run by anemll_fast.
    As in coremltools it has no spec or metadata, and input names the function lacks are ignored."""

    def __init__(self, path: str, compute_units: ComputeUnit = ComputeUnit.ALL,
                 function_name: Optional[str] = None, optimization_hints: Optional[dict] = None,
                 asset: Any = None) -> None:
        if function_name is None:
            function_name = ""
        if not isinstance(path, str):
            raise TypeError('The "path" parameter must be of type "str".')
        _check_compute_units(compute_units, 'The "compute_units" parameter must be of type: '
                                            '"coremltools.ComputeUnit".')
        if not isinstance(function_name, str):
            raise TypeError('The "function_name" parameter must be of type "str".')
        if optimization_hints is not None and not isinstance(optimization_hints, dict):
            raise TypeError('"optimization_hints" must be a dictionary or None')
        if asset is not None:
            raise NotImplementedError("anemll_fast's CompiledMLModel loads from a path; MLModelAsset is not supported")
        full = os.path.expanduser(path)
        self.compute_unit = compute_units
        self.function_name = function_name
        self.path_or_asset = full
        self.optimization_hints = dict(optimization_hints) if optimization_hints is not None else None
        if not os.path.isdir(full):
            raise RuntimeError(f"Error loading model: no compiled model at {full} (a valid manifest does not "
                               f"exist at path: {full})")
        self._bind_function(_open(full, compute_units), full, function_name, compiled_api=True)
        self._proxy = self._runner

    @classmethod
    def from_asset(cls, asset: Any, compute_units: ComputeUnit = ComputeUnit.ALL,
                   function_name: Optional[str] = None, optimization_hints: Optional[dict] = None) -> Any:
        raise NotImplementedError("anemll_fast's CompiledMLModel loads from a path; MLModelAsset is not supported")

    def predict(self, data: Any, state: Optional[MLState] = None) -> Any:
        """Outputs of the model for `data` (a dict, or a list of dicts), updating `state` in place."""
        return self._predict(data, state, strict_names=False)

    def make_state(self) -> MLState:
        return self._make_state()


def _is_ml_program(model: Any) -> bool:
    """False for what only coremltools can run: a single-file .mlmodel or a spec of another model type.
    (A path that does not exist counts as ours, to be refused with coremltools' error.)"""
    from coremltools import proto

    if isinstance(model, proto.Model_pb2.Model):
        return model.WhichOneof("Type") == "mlProgram"
    if isinstance(model, (str, os.PathLike)):
        return not os.path.isfile(os.path.expanduser(os.path.expandvars(os.fspath(model))))
    return True


def _open(path: str, compute_units: ComputeUnit) -> files.LoadedFile:
    """The shared loaded file; a file that is no model raises RuntimeError as Core ML's load does."""
    from anemll_fast.mil.errors import MilError

    try:
        return files.open_file(path, files.backend_name(), files.COMPUTE_UNITS[compute_units.name])
    except MilError as e:
        hint = ""
        if not (os.path.isfile(os.path.join(path, "Manifest.json")) or os.path.isfile(os.path.join(path, "model.mil"))):
            hint = f"A valid manifest does not exist at path: {path}. "
        raise RuntimeError(f"{hint}{e}") from e


def _weights_dir(package: str) -> Optional[str]:
    for candidate in (os.path.join(package, "Data", "com.apple.CoreML", "weights"), os.path.join(package, "weights")):
        if os.path.isdir(candidate):
            return candidate
    return None


__all__: List[str] = ["MLModel", "CompiledMLModel", "MLState"]
