"""Loaded ML Programs, cached on disk and once per process.

Parsing a model file (a protobuf spec of tens of thousands of ops, or
model.mil text) costs seconds; reading its weights costs what the disk
gives. So the parsed program is stored, weights left out (each weight tensor
becomes a BlobRef: file, offset, dtype, shape), in
`<cache>/programs/<key>.pkl`, its decoded weights beside it, and a later load
reads that structure and maps the weights.

- Key: the model directory's real path, the package and format versions, and
  for every file the program depends on its size and mtime; the spec file
  (model.mlmodel / model.mil) is also hashed whole, the weight files by their
  first and last 64 KiB (hashing hundreds of MB would cost as much as reading
  them; a changed weight file also changes its size or mtime, and every blob
  read checks its own header).
- Safe across processes: an entry is written to a temporary file in the
  same directory and renamed into place, so readers see a whole entry or
  none. A corrupt, truncated or foreign entry is ignored and rewritten.
- Entries are pickles read through an unpickler that only builds the IR's
  own classes and numpy arrays, never arbitrary objects.
- Within a process each file is parsed once (the structure is memoized as
  its pickled bytes) and the weights of a program in use are shared by every
  function loaded from it (the reference backend loads `prefill` and `infer`
  of one chunk file).
- Weights, once read (in their storage dtype, sub-byte indices unpacked one
  per byte, as the reference backend's kernels take them), are stored beside
  the entry (`<key>.weights`) and memory-mapped by later loads: a second load
  decodes no weight file at all, pages come in as the first tokens touch them,
  and processes running one model share them. That file is checked by its
  header (key) and size; its bytes are trusted as the model files are.

Plans fuse op chains (anemll_fast/mil/fusion.py), each fused chain checked by
a probe of its bits when built: which chains fused, with the probes' outcomes,
is kept per function in `<key>.fusion` (JSON, with the key and the fusion code
key: the interpreter's sources, the native kernels' binary and the CPU paths
taken), so that a later build replays it instead of scanning and probing every
candidate. A record of another code key, damaged, or that does not fit the steps
it is replayed on is ignored, and the outcome recomputed and stored again.

`ANEMLL_FAST_PROGRAM_CACHE` names another directory, or `off` disables the
disk cache. `anemll-fast cache clear` empties it.

Size: after each write, entries are removed least recently used first (a hit
touches its `.pkl`) while there are more than MAX_ENTRIES of them or they take
more than `ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE` (bytes, or with a K/M/G/T
suffix; default DEFAULT_MAX_SIZE) together with their weights; the entry just
written always stays. Another process may still be using a removed entry: its
weights stay mapped (POSIX keeps an unlinked file's pages while they are
mapped), and a process that finds half an entry (its `.weights` gone) reads
the weights again and rewrites it. Temporary files older than an hour, left by
a process that died mid-write, go too.
"""
from __future__ import annotations

import copyreg
import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from anemll_fast.mil.blobfile import BlobCache, BlobRef
from anemll_fast.mil.loader import load_program as _parse
from anemll_fast.mil.program import Op, Program, Value, Var

log = logging.getLogger("anemll_fast")

FORMAT = 2  # bump when the IR classes or how entries store them change
MAGIC = b"ANEMLL_FAST_PROGRAM\n"
MAX_ENTRIES = 256  # least recently used entries beyond this are removed after a write
DEFAULT_MAX_SIZE = 8 << 30  # bytes of entries and their weights; ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE overrides
_STALE_TMP = 3600.0  # seconds after which a temporary file is a dead writer's
WEIGHTS_MAGIC = b"ANEMLL_FAST_WEIGHTS\n"
WEIGHTS_HEADER = 128  # magic, key, padding: data starts 64-byte aligned
_EDGE = 64 * 1024

_lock = threading.Lock()
_structures: Dict[str, bytes] = {}  # key -> pickled structure, this process
_parsed: Dict[str, Tuple[Program, List[Value]]] = {}  # key -> structure, weights unread (a few)
_MAX_PARSED = 8
_loaded: "weakref.WeakValueDictionary[str, Program]" = weakref.WeakValueDictionary()  # key -> with weights
_hashes: Dict[Tuple[Any, ...], str] = {}  # (path, whole, stat) -> sha256 of the file (see _fingerprint)
_SUFFIXES = (".pkl", ".weights", ".fusion")  # the files of one entry
FUSION_MAGIC = "anemll_fast fusion records 1"


def cache_dir() -> Optional[Path]:
    """Where entries live; None when the disk cache is off."""
    env = os.environ.get("ANEMLL_FAST_PROGRAM_CACHE")
    if env is not None and env.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    if env:
        return Path(env).expanduser()
    from anemll_fast.default_model import cache_root

    return cache_root() / "programs"


def clear() -> int:
    """Remove every entry, with its weights (and this process's memo); returns how many entries went."""
    with _lock:
        _structures.clear()
        _parsed.clear()
        _hashes.clear()
    folder = cache_dir()
    if folder is None or not folder.is_dir():
        return 0
    n = 0
    for f in folder.iterdir():
        if f.is_file() and (f.suffix in _SUFFIXES or f.name.startswith(".tmp")):
            try:
                f.unlink()
                n += f.suffix == ".pkl"
            except FileNotFoundError:
                pass
    return n


def max_size() -> int:
    """The size cap of the disk cache in bytes (ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE, else DEFAULT_MAX_SIZE)."""
    text = os.environ.get("ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE", "").strip()
    if not text:
        return DEFAULT_MAX_SIZE
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, scale = text.upper().rstrip("IB"), 1
    if number[-1:] in units:
        number, scale = number[:-1], units[number[-1]]
    try:
        value = float(number) * scale
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE: expected a size in bytes, optionally with a "
                         f"K, M, G or T suffix (e.g. 8G), got {text!r}")
    return int(value)


# ------------------------------------------------------------------ the key
def _files(path: str) -> Tuple[Path, List[Path]]:
    """(the spec file, the other files the program reads) of a model directory."""
    root = Path(path)
    if (root / "model.mil").is_file():
        spec = root / "model.mil"
    else:
        from anemll_fast.mil.proto_loader import find_root_model

        spec = Path(find_root_model(path)[0])
    others = sorted(p for p in root.rglob("*") if p.is_file() and p != spec)
    return spec, others


def _fingerprint(f: Path, whole: bool) -> List[Any]:
    st = f.stat()
    # A load asks for the key of each file several times (the config reader, then each function the backend
    # loads); the hash is remembered in this process under the file's full stat. Any write to the file moves
    # its ctime, which (unlike mtime) no utime() call can put back, so a rewritten file is hashed again
    # (unless it is rewritten at the same size within the filesystem clock's tick, milliseconds, of the
    # hashing; across processes nothing is remembered).
    stamp = (str(f), whole, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        digest = _hashes.get(stamp)
    if digest is None:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            if whole or st.st_size <= 2 * _EDGE:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(_EDGE))
                fh.seek(-_EDGE, os.SEEK_END)
                h.update(fh.read(_EDGE))
        digest = h.hexdigest()
        with _lock:
            _hashes[stamp] = digest
    return [st.st_size, st.st_mtime_ns, digest]


def content_fingerprint(path: str) -> str:
    """What a model directory holds, wherever it lives: the spec hashed whole,
    the other files by name, size and first and last 64 KiB (no path, no mtime)."""
    real = os.path.realpath(path)
    spec, others = _files(real)
    parts: List[Any] = [_fingerprint(spec, True)[::2]]
    for f in others:
        parts.append([os.path.relpath(f, real), _fingerprint(f, False)[::2]])
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def program_key(path: str) -> str:
    """The cache key of the model directory at `path` (see the module docstring)."""
    from anemll_fast import __version__

    real = os.path.realpath(path)
    spec, others = _files(real)
    parts: List[Any] = [FORMAT, __version__, real, os.path.relpath(spec, real), _fingerprint(spec, True)]
    for f in others:
        parts.append([os.path.relpath(f, real), _fingerprint(f, False)])
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# -------------------------------------------------------------- the entries
_ALLOWED = {
    ("anemll_fast.mil.program", n) for n in
    ("Program", "Function", "Op", "Var", "Value", "TensorType", "StateType", "OtherType", "FeatureSpec",
     "FunctionSpec")
} | {("anemll_fast.mil.blobfile", "BlobRef")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
} | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | {("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "set"), ("builtins", "frozenset"),
     ("builtins", "complex"), ("builtins", "slice")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a program cache entry")
        return super().find_class(module, name)


def _blob_values(program: Program) -> List[Value]:
    """Every constant of the program whose data is an unread BlobRef, one per
    stored tensor: functions of a multifunction file reference the same blobs,
    and their values share one BlobRef (so one array, read once)."""
    out: List[Value] = []
    refs: Dict[Tuple[str, int, str, Tuple[int, ...]], BlobRef] = {}

    def visit(v: Any) -> None:
        if isinstance(v, Value) and isinstance(v.data, BlobRef):
            r = v.data
            where = (r.path, r.offset, r.dtype, r.shape)
            if where in refs:
                v.data = refs[where]
            else:
                refs[where] = r
            out.append(v)

    for fn in program.functions.values():
        for v in fn.attributes.values():
            visit(v)
        for op in fn.ops:
            for v in op.attributes.values():
                visit(v)
            for binds in op.inputs.values():
                for b in binds:
                    visit(b)
    return out


def _blob_values_of(program: Program) -> List[Value]:
    """The weight values of a loaded program (tests and tools)."""
    out: List[Value] = []
    for fn in program.functions.values():
        for op in fn.ops:
            for v in list(op.attributes.values()) + [b for binds in op.inputs.values() for b in binds]:
                if isinstance(v, Value) and isinstance(v.data, np.ndarray) and v.data.size >= 1024:
                    out.append(v)
    return out


def _share_types(program: Program) -> None:
    """One object per distinct type (types are frozen): the parser makes one per variable and constant,
    ~30k for SmolLM2's FFN file, and an entry that stores each once is read back with as many fewer
    objects to build (and for the garbage collector to walk)."""
    seen: Dict[Any, Any] = {}

    def one(t: Any) -> Any:
        return seen.setdefault(t, t)

    def value(b: Any) -> None:
        if isinstance(b, Value):
            b.type = one(b.type)

    def ops(items: List[Any]) -> None:
        for op in items:
            for v in op.outputs:
                v.type = one(v.type)
            for v in op.attributes.values():
                value(v)
            for binds in op.inputs.values():
                for b in binds:
                    value(b)
            for block in op.blocks:
                for v in block.inputs:
                    v.type = one(v.type)
                ops(block.ops)

    for fn in program.functions.values():
        for v in fn.inputs:
            v.type = one(v.type)
        for v in fn.attributes.values():
            value(v)
        ops(fn.ops)


def _share_strings(program: Program) -> None:
    """One object per distinct name string (op types, parameter names, variable names): the parser makes
    a new one at each use (SmolLM2's FFN file: 72k strings, 5.7k distinct), and the pickler stores each
    object once, so an entry then holds a third fewer bytes and reads back ~10 ms faster."""
    seen: Dict[str, str] = {}

    def one(text: Any) -> Any:
        return seen.setdefault(text, text) if type(text) is str else text

    def var(v: Any) -> None:
        v.name = one(v.name)

    def ops(items: List[Any]) -> None:
        for op in items:
            op.type = one(op.type)
            op.name = one(op.name)
            op.inputs = {one(k): [one(b) for b in binds] for k, binds in op.inputs.items()}
            op.attributes = {one(k): v for k, v in op.attributes.items()}
            for v in op.attributes.values():
                v.data = one(v.data)
            for v in op.outputs:
                var(v)
            for block in op.blocks:
                for v in block.inputs:
                    var(v)
                block.outputs = [one(o) for o in block.outputs]
                ops(block.ops)

    for fn in program.functions.values():
        for v in fn.inputs:
            var(v)
        fn.outputs = [one(o) for o in fn.outputs]
        ops(fn.ops)


# The most numerous IR objects are stored as their constructor's arguments: read back, each is one call
# instead of an empty object, a state dict and its update (an FFN entry of SmolLM2 loads 15% faster).
_COMPACT = {
    Op: lambda o: (Op, (o.type, o.inputs, o.outputs, o.attributes, o.name, o.blocks)),
    Var: lambda v: (Var, (v.name, v.type)),
    Value: lambda v: (Value, (v.type, v.data)),
}


def _dumps(program: Program, key: str) -> bytes:
    _share_types(program)
    _share_strings(program)
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, **_COMPACT}
    pickler.dump({"key": key, "program": program, "blobs": _blob_values(program)})
    return MAGIC + FORMAT.to_bytes(4, "little") + out.getvalue()


def _loads(data: bytes, key: str) -> Tuple[Program, List[Value]]:
    if not data.startswith(MAGIC) or int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little") != FORMAT:
        raise ValueError("not a program cache entry of this format")
    entry = _Unpickler(io.BytesIO(data[len(MAGIC) + 4:])).load()
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("program"), Program):
        raise ValueError("entry of another key")
    return entry["program"], entry["blobs"]


def _read_entry(folder: Path, key: str) -> Optional[Tuple[bytes, Tuple[Program, List[Value]]]]:
    f = folder / f"{key}.pkl"
    try:
        data = f.read_bytes()
        entry = data, _loads(data, key)  # checked whole before anyone relies on it
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - any damage means: rebuild it
        log.warning("anemll_fast: ignoring a damaged program cache entry %s (%s)", f, exc)
        return None
    try:
        os.utime(f)  # used now: pruning removes the least recently used entries first
    except OSError:
        pass  # a read-only cache still serves
    return entry


def _write_entry(folder: Path, key: str, data: bytes) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pkl", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, folder / f"{key}.pkl")  # atomic: readers see all of it or nothing
        except BaseException:
            os.unlink(tmp)
            raise
        _prune(folder, keep=key)
    except OSError as exc:  # a read-only or full disk costs speed, never the load
        log.warning("anemll_fast: cannot write the program cache in %s (%s)", folder, exc)


def _prune(folder: Path, keep: str = "", cap: Optional[int] = None) -> None:
    """Remove least recently used entries beyond MAX_ENTRIES or `cap` bytes (default: max_size()),
    never the entry `keep` (see the module docstring)."""
    cap = max_size() if cap is None else cap
    now = time.time()
    entries: Dict[str, List[Any]] = {}  # key -> [last use, bytes]
    for f in folder.iterdir():
        try:
            st = f.stat()
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        if f.name.startswith(".tmp-"):
            if now - st.st_mtime > _STALE_TMP:
                _unlink(f)
            continue
        if f.suffix not in _SUFFIXES:
            continue
        entry = entries.setdefault(f.stem, [0.0, 0])
        entry[1] += st.st_size
        if f.suffix == ".pkl":
            entry[0] = st.st_mtime  # touched by every hit
    total = sum(size for _, size in entries.values())
    oldest_first = sorted((used, k) for k, (used, _size) in entries.items() if k != keep)
    count = len(entries)
    for _used, k in oldest_first:
        if count <= MAX_ENTRIES and total <= cap:
            break
        for suffix in _SUFFIXES:
            _unlink(folder / f"{k}{suffix}")
        total -= entries[k][1]
        count -= 1


def _unlink(f: Path) -> None:
    try:
        f.unlink()
    except FileNotFoundError:
        pass


def _structure(path: str, key: str) -> Tuple[Program, List[Value]]:
    """A fresh copy of the structure of the program at `path`, from this
    process's memo, else the disk cache, else parsed (and stored)."""
    with _lock:
        data = _structures.get(key)
    if data is not None:
        return _loads(data, key)
    folder = cache_dir()
    entry = _read_entry(folder, key) if folder is not None else None
    if entry is not None:
        data, parsed = entry
    else:
        from anemll_fast import progress

        with progress.bar(desc=f"parsing {os.path.basename(path)}", bar_format="{desc} ({elapsed})") as b:
            program = _parse(path, read_weights=False)
            b.update()
        data = _dumps(program, key)
        parsed = (program, _blob_values(program))
        if folder is not None:
            _write_entry(folder, key, data)
    with _lock:
        _structures[key] = data
    return parsed


Group = Tuple[BlobRef, List[Value]]  # one stored tensor and the values that use it


def _groups(blobs: List[Value]) -> List[Group]:
    by_ref: Dict[int, Group] = {}
    for v in blobs:
        by_ref.setdefault(id(v.data), (v.data, []))[1].append(v)
    return list(by_ref.values())


def _nbytes(ref: BlobRef) -> int:
    return int(np.prod(ref.shape, dtype=np.int64)) * (2 if ref.dtype == "fp16" else 1)


def _read_weights(groups: List[Group], label: str = "") -> None:
    """Replace each BlobRef by its array; numpy converts without the GIL, so
    the larger tensors are read on a few threads."""
    from anemll_fast import progress

    reader = BlobCache()
    total = sum(_nbytes(ref) for ref, _ in groups)
    shown = progress.bar(total=total, desc=f"reading {label}", unit="B", unit_scale=True, unit_divisor=1024,
                         enabled=total >= (64 << 20))

    def one(group: Group) -> None:
        ref, values = group
        arr = reader.read(ref)
        for v in values:
            v.data = arr
        shown.update(_nbytes(ref))

    try:
        for ref, _ in groups:  # opens (and checks) every weight file first, on this thread
            reader.reader(ref.path)
        big = [g for g in groups if _nbytes(g[0]) >= (1 << 17)]
        for g in groups:
            if _nbytes(g[0]) < (1 << 17):
                one(g)
        workers = min(4, os.cpu_count() or 1)
        if workers > 1 and len(big) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, big))
        else:
            for g in big:
                one(g)
    finally:
        shown.close()
        reader.close()


def _layout(groups: List[Group]) -> Tuple[List[Tuple[int, Any, Tuple[int, ...]]], int]:
    """(offset, numpy dtype, shape) of each decoded tensor in a weights file, and its data size."""
    from anemll_fast.mil.program import NUMPY_DTYPES

    out, off = [], 0
    for ref, _ in groups:
        dt = np.dtype(np.float32 if ref.dtype == "bf16" else NUMPY_DTYPES[ref.dtype])  # as BlobReader.read
        out.append((off, dt, ref.shape))
        off += -(-int(np.prod(ref.shape, dtype=np.int64)) * dt.itemsize // 64) * 64
    return out, off


def _map_weights(folder: Path, key: str, groups: List[Group]) -> bool:
    """Point every value at its decoded tensor in `<key>.weights` (a read-only map)."""
    f = folder / f"{key}.weights"
    layout, total = _layout(groups)
    try:
        size = f.stat().st_size
    except OSError:  # absent, or the cache directory is unusable
        return False
    try:
        if size != WEIGHTS_HEADER + total:
            raise ValueError(f"{size} bytes, expected {WEIGHTS_HEADER + total}")
        mm = np.memmap(f, dtype=np.uint8, mode="r")
        head = WEIGHTS_MAGIC + key.encode()
        if bytes(mm[:len(head)]) != head:
            raise ValueError("header of another entry")
    except (OSError, ValueError) as exc:
        log.warning("anemll_fast: ignoring a damaged program cache weights file %s (%s)", f, exc)
        return False
    for (_ref, values), (off, dt, shape) in zip(groups, layout):
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        # a plain ndarray over the map: results computed from a np.memmap are np.memmap too, and
        # each one costs a __array_finalize__ that showed up as a third of a decode step
        arr = mm[WEIGHTS_HEADER + off:WEIGHTS_HEADER + off + n].view(np.ndarray).view(dt).reshape(shape)
        for v in values:
            v.data = arr
    return True


def _write_weights(folder: Path, key: str, groups: List[Group], layout: List[Tuple[int, Any, Tuple[int, ...]]],
                   total: int) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".weights", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write((WEIGHTS_MAGIC + key.encode()).ljust(WEIGHTS_HEADER, b"\0"))
                for (_ref, values), (off, _dt, _shape) in zip(groups, layout):
                    fh.seek(WEIGHTS_HEADER + off)
                    fh.write(memoryview(np.ascontiguousarray(values[0].data)).cast("B"))
                fh.truncate(WEIGHTS_HEADER + total)
            os.replace(tmp, folder / f"{key}.weights")  # atomic, as the entries
        except BaseException:
            os.unlink(tmp)
            raise
        _prune(folder, keep=key)  # the weights are most of an entry's size
    except OSError as exc:
        log.warning("anemll_fast: cannot write the program cache in %s (%s)", folder, exc)


# ------------------------------------------------------------ fusion records
class FusionRecords:
    """The fusion outcomes of one cached program's plans (see the module docstring and
    anemll_fast.mil.plan.FusionRecords): `<key>.fusion`, read once per process."""

    def __init__(self, folder: Path, key: str):
        self.file = folder / f"{key}.fusion"
        self.key = key
        self._records: Optional[Dict[str, Any]] = None

    @property
    def code(self) -> str:
        from anemll_fast.mil.fusion import code_key

        return code_key()  # (computed once per process, when a plan first fuses)

    def _read(self) -> Dict[str, Any]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("anemll_fast: ignoring a damaged fusion record file %s (%s)", self.file, exc)
            return {}
        if not isinstance(data, dict) or data.get("magic") != FUSION_MAGIC or data.get("key") != self.key or \
                data.get("code") != self.code or not isinstance(data.get("plans"), dict):
            return {}  # another program's, another format's, or made by other code: rewritten on put
        return data["plans"]

    def get(self, function_name: str) -> Optional[Dict[str, Any]]:
        if self._records is None:
            self._records = self._read()
        rec = self._records.get(function_name)
        return rec if isinstance(rec, dict) else None

    def put(self, function_name: str, record: Dict[str, Any]) -> None:
        plans = self._read()  # another process may have stored other functions meanwhile
        plans[function_name] = record
        self._records = plans
        body = json.dumps({"magic": FUSION_MAGIC, "key": self.key, "code": self.code, "plans": plans},
                          separators=(",", ":"))
        folder = self.file.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".fusion", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(body)
                os.replace(tmp, self.file)  # atomic, as the entries
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:  # costs the next load its probes, never this one (and a read-only cache
            # that serves every load would otherwise warn at each)
            log.debug("anemll_fast: cannot write fusion records in %s (%s)", folder, exc)


def fusion_records(program: Program) -> Optional[FusionRecords]:
    """Where the plans of `program` keep their fusion outcomes: None unless it was loaded through the
    disk cache (by load_program) and its entry is there."""
    key = program.__dict__.get("_program_cache_key")
    folder = cache_dir()
    if key is None or folder is None or not (folder / f"{key}.pkl").is_file():
        return None
    return FusionRecords(folder, key)


# ----------------------------------------------------------------- the API
def load_program(path: str, read_weights: bool = True) -> Program:
    """As anemll_fast.mil.load_program, through the caches.

    With read_weights=False weights stay BlobRefs (unless the program is
    already loaded with them). With weights, one Program object is shared
    while it is in use, so that its decoded constants are too.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _parse(path, read_weights)  # the loader's own error
    key = program_key(path)
    with _lock:
        hit = _loaded.get(key)
        parsed = _parsed.pop(key, None) if read_weights else _parsed.get(key)
    if hit is not None:
        return hit
    if parsed is None:
        parsed = _structure(path, key)
    program, blobs = parsed
    program.__dict__["_program_cache_key"] = key  # for fusion_records (not pickled: _dumps ran before)
    if not read_weights:
        with _lock:
            _parsed[key] = parsed
            while len(_parsed) > _MAX_PARSED:
                _parsed.pop(next(iter(_parsed)))
        return program
    groups = _groups(blobs)
    folder = cache_dir()
    if folder is None or not _map_weights(folder, key, groups):
        layout, total = _layout(groups)
        _read_weights(groups, os.path.basename(path))
        if folder is not None and (folder / f"{key}.pkl").is_file():
            _write_weights(folder, key, groups, layout, total)
    with _lock:
        return _loaded.setdefault(key, program)
