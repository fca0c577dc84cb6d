"""A pure-Python Core ML backend on coremltools: the baseline the benchmarks compare the native
backend against, and the fallback when the native extension lacks its Core ML backend.

Same surface as the reference backend's model object:

    model = load("chunk_01of02.mlpackage", function_name="prefill", compute_units="cpu_and_ne")
    state = model.make_state()
    outputs = model.predict({"hidden_states": h, ...}, state)   # {name: numpy array}

Core ML predictions only run on macOS: elsewhere `load` validates its arguments and then raises
CoreMLToolsUnavailable naming why. `.mlpackage` files are compiled once and cached by content hash
(the same digest as csrc/coreml/package_cache.h) under $ANEMLL_FAST_COREML_CACHE or
~/Library/Caches/anemll_fast/coreml, in a `coremltools` subdirectory.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from anemll_fast.errors import AnemllError

PathLike = Union[str, "os.PathLike[str]"]

# Our names -> coremltools.ComputeUnit member names.
COMPUTE_UNITS: Dict[str, str] = {
    "all": "ALL",
    "cpu_only": "CPU_ONLY",
    "cpu_and_gpu": "CPU_AND_GPU",
    "cpu_and_ne": "CPU_AND_NE",
}
MODEL_SUFFIXES = (".mlpackage", ".mlmodelc", ".mlmodel")
CACHE_ENV = "ANEMLL_FAST_COREML_CACHE"


class CoreMLToolsError(AnemllError):
    """The coremltools backend failed (load, state or prediction)."""


class CoreMLToolsArgumentError(CoreMLToolsError, ValueError):
    """A bad argument to the coremltools backend: path, function name, compute units, inputs."""


class CoreMLToolsUnavailable(CoreMLToolsError):
    """Core ML cannot run here: not macOS, a macOS too old for the request, or no coremltools."""


# ----------------------------------------------------------------- validation
def normalize_compute_units(compute_units: Any) -> str:
    """'all' | 'cpu_only' | 'cpu_and_gpu' | 'cpu_and_ne' (case-insensitive), or a coremltools.ComputeUnit."""
    name = getattr(compute_units, "name", compute_units)  # a ComputeUnit enum member
    if isinstance(name, str):
        key = name.strip().lower()
        if key in COMPUTE_UNITS:
            return key
        for ours, theirs in COMPUTE_UNITS.items():
            if key == theirs.lower():
                return ours
    raise CoreMLToolsArgumentError(
        f"compute_units: {compute_units!r} is not one of {sorted(COMPUTE_UNITS)}"
    )


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise CoreMLToolsArgumentError(f"path: expected a file path, got {type(path).__name__}")
    p = Path(os.fspath(path))
    if not p.exists():
        raise CoreMLToolsArgumentError(f"path: {p}: no such file or directory")
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise CoreMLToolsArgumentError(
            f"path: {p}: not a Core ML model (expected one of {', '.join(MODEL_SUFFIXES)})"
        )
    return p


def _check_function(function_name: Any) -> Optional[str]:
    if function_name is None:
        return None
    if not isinstance(function_name, str) or not function_name.strip():
        raise CoreMLToolsArgumentError(
            f"function_name: expected None or a non-empty string, got {function_name!r}"
        )
    return function_name


def macos_version() -> Optional[Tuple[int, ...]]:
    """(major, minor, ...) on macOS, None elsewhere."""
    if sys.platform != "darwin":
        return None
    text = platform.mac_ver()[0]
    try:
        return tuple(int(x) for x in text.split(".") if x)
    except ValueError:
        return None


def _require_macos(p: Path, function_name: Optional[str]) -> Tuple[int, ...]:
    version = macos_version()
    if version is None:
        raise CoreMLToolsUnavailable(
            f"{p}: the coremltools backend runs Core ML predictions, which exist only on macOS "
            f"(this is {platform.system() or sys.platform}); use the reference backend here"
        )
    if version < (13,):
        raise CoreMLToolsUnavailable(f"{p}: the coremltools backend needs macOS 13 or newer; this is macOS "
                                     f"{'.'.join(map(str, version))}")
    if function_name is not None and version < (15,):
        raise CoreMLToolsUnavailable(
            f"{p}: loading function {function_name!r} of a multifunction model needs macOS 15; this is macOS "
            f"{'.'.join(map(str, version))}"
        )
    return version


# ---------------------------------------------------------------- the cache
def content_digest(path: PathLike) -> str:
    """SHA-256 of a model package's content, byte for byte the digest of csrc/coreml/package_cache.h:
    entries in relative-path order, b"D" rel NUL for directories, b"F" rel NUL size(u64 LE) bytes for files."""
    root = Path(os.fspath(path))
    h = hashlib.sha256()
    if root.is_file():
        entries: List[Tuple[str, Path]] = [("", root)]
    else:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                if full.is_symlink():
                    raise CoreMLToolsArgumentError(f"{full}: symbolic links are not allowed inside a model package")
                entries.append((full.relative_to(root).as_posix(), full))
        entries.sort(key=lambda e: e[0].encode("utf-8"))
    for rel, full in entries:
        if full.is_dir():
            h.update(b"D" + rel.encode("utf-8") + b"\0")
            continue
        size = full.stat().st_size
        h.update(b"F" + rel.encode("utf-8") + b"\0" + struct.pack("<Q", size))
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env) / "coremltools"
    return Path.home() / "Library" / "Caches" / "anemll_fast" / "coreml" / "coremltools"


def _compiled(p: Path, ct: Any) -> Path:
    """The .mlmodelc of a .mlpackage/.mlmodel, compiled once per content and OS/coremltools version."""
    salt = f"{platform.mac_ver()[0]}|coremltools {getattr(ct, '__version__', '?')}"
    key = hashlib.sha256((content_digest(p) + "\0" + salt).encode("utf-8")).hexdigest()
    final = cache_root() / key / (p.stem + ".mlmodelc")
    if final.is_dir():
        return final
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent.parent))
    try:
        ct.utils.compile_model(str(p), destination_path=str(staging / final.name))
        try:
            os.rename(staging, final.parent)
        except OSError:
            if not final.is_dir():  # not a concurrent install that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# ---------------------------------------------------------------- the model
class CoreMLToolsModel:
    """One function of one Core ML model, run through coremltools on macOS."""

    def __init__(self, path: Path, function_name: Optional[str], compute_units: str, model: Any,
                 spec_io: Tuple[List[str], List[str], List[str]]):
        self.path = str(path)
        self.function_name = function_name
        self.compute_units = compute_units
        self._model = model
        self.input_names, self.output_names, self.state_names = spec_io

    def make_state(self) -> Any:
        """A fresh, zeroed Core ML state (shareable by models with identical state specs)."""
        if not self.state_names:
            raise CoreMLToolsArgumentError(f"{self}: the model declares no state")
        try:
            return self._model.make_state()
        except Exception as exc:  # coremltools raises plain Exceptions
            raise CoreMLToolsError(f"{self}: cannot make a state: {exc}") from exc

    def predict(self, inputs: Mapping[str, np.ndarray], state: Any = None) -> Dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise CoreMLToolsArgumentError(f"{self}: inputs must be a dict of name -> array, "
                                           f"got {type(inputs).__name__}")
        if self.input_names:
            unknown = sorted(set(inputs) - set(self.input_names))
            missing = sorted(set(self.input_names) - set(inputs))
            if unknown or missing:
                raise CoreMLToolsArgumentError(f"{self}: unexpected inputs {unknown}, missing inputs {missing} "
                                               f"(the model takes {self.input_names})")
        if self.state_names and state is None:
            raise CoreMLToolsArgumentError(f"{self}: the model uses states {self.state_names}; "
                                           f"pass state=model.make_state()")
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        try:
            out = self._model.predict(feed, state=state) if state is not None else self._model.predict(feed)
        except Exception as exc:
            raise CoreMLToolsError(f"{self}: prediction failed: {exc}") from exc
        return {k: np.asarray(v) for k, v in out.items()}

    def __repr__(self) -> str:
        fn = f", function={self.function_name!r}" if self.function_name else ""
        return f"CoreMLToolsModel({os.path.basename(self.path)!r}{fn}, compute_units={self.compute_units!r})"


def _spec_io(model: Any, function_name: Optional[str]) -> Tuple[List[str], List[str], List[str]]:
    """Input, output and state names from the model's spec (empty lists when unreadable)."""
    try:
        spec = model.get_spec()
    except Exception:
        return [], [], []
    desc = spec.description
    fns = list(getattr(desc, "functions", []))
    if fns:
        name = function_name or desc.defaultFunctionName
        for f in fns:
            if f.name == name:
                desc = f
                break
    return ([i.name for i in desc.input], [o.name for o in desc.output],
            [s.name for s in getattr(desc, "state", [])])


def load(path: PathLike, function_name: Optional[str] = None, compute_units: Any = "cpu_and_ne") -> CoreMLToolsModel:
    """Load `function_name` (None: the default function) of a .mlpackage, .mlmodelc or .mlmodel."""
    p = _check_path(path)
    function_name = _check_function(function_name)
    units = normalize_compute_units(compute_units)
    _require_macos(p, function_name)
    try:
        import coremltools as ct
    except ImportError as exc:  # pragma: no cover - coremltools is a dependency
        raise CoreMLToolsUnavailable(f"{p}: coremltools is not installed") from exc
    cu = getattr(ct.ComputeUnit, COMPUTE_UNITS[units])
    kwargs: Dict[str, Any] = {"compute_units": cu}
    if function_name is not None:
        kwargs["function_name"] = function_name
    try:
        spec_model = None
        if p.suffix.lower() != ".mlmodelc":
            spec_model = ct.models.MLModel(str(p), skip_model_load=True)
            compiled = _compiled(p, ct)
        else:
            compiled = p
        model = ct.models.CompiledMLModel(str(compiled), **kwargs)
    except CoreMLToolsError:
        raise
    except Exception as exc:
        fn = f" function {function_name!r}" if function_name else ""
        raise CoreMLToolsError(f"{p}{fn}: Core ML cannot load it: {exc}") from exc
    io = _spec_io(spec_model, function_name) if spec_model is not None else ([], [], [])
    return CoreMLToolsModel(p, function_name, units, model, io)


class CoreMLToolsBackend:
    """Entry point mirroring ReferenceBackend: CoreMLToolsBackend(compute_units).load(path, function_name)."""

    name = "coremltools"

    def __init__(self, compute_units: Any = "cpu_and_ne"):
        self.compute_units = normalize_compute_units(compute_units)

    def load(self, path: PathLike, function_name: Optional[str] = None) -> CoreMLToolsModel:
        return load(path, function_name, self.compute_units)


__all__ = ["COMPUTE_UNITS", "CoreMLToolsArgumentError", "CoreMLToolsBackend", "CoreMLToolsError",
           "CoreMLToolsModel", "CoreMLToolsUnavailable", "cache_root", "content_digest", "load",
           "macos_version", "normalize_compute_units"]
