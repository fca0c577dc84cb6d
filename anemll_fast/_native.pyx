# cython: language_level=3
"""Thin typed skin over the C++ engine in csrc/: the only code touching Python.

NativeEngine runs the pipeline; NullBackend and CallbackBackend are the two
backends built here (the CoreML one comes from csrc/coreml on macOS).
"""
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy
from libcpp.string cimport string
from libcpp.vector cimport vector
from cpython.ref cimport PyObject

from ._engine_api cimport *

import ctypes
import json
import os

import numpy as np

cdef extern from "engine/build_info.h" namespace "anemll":
    int kAbiVersion
    bint have_coreml_backend()
    const char* build_description()


ABI_VERSION = kAbiVersion
BACKEND_ABI_VERSION = ANEMLL_BACKEND_ABI_VERSION

# Status codes of csrc/engine/engine.h.
STATUS_INVALID_ARGUMENT = 1
STATUS_CONFIG_ERROR = 2
STATUS_BACKEND_ERROR = 3

DTYPE_CODES = {
    "FLOAT16": 1, "FLOAT32": 2, "FLOAT64": 3, "INT32": 4,
    "INT16": 5, "INT8": 6, "UINT8": 7, "BOOL": 8,
}
_NP_OF_CODE = {1: np.float16, 2: np.float32, 3: np.float64, 4: np.int32,
               5: np.int16, 6: np.int8, 7: np.uint8, 8: np.bool_}


def build_info():
    """What this native build contains: ABI version, compiler, CoreML backend."""
    return {
        "abi_version": kAbiVersion,
        "backend_abi_version": ANEMLL_BACKEND_ABI_VERSION,
        "compiler": build_description().decode("utf-8", "replace"),
        "coreml_backend": bool(have_coreml_backend()),
    }


# ----------------------------------------------------------------- test hooks
def alloc_counting(bint on):
    """Start or stop counting operator new calls made inside the native library."""
    set_alloc_counting(on)


def alloc_counter():
    """Number of operator new calls counted so far."""
    return alloc_count()


def alloc_probe_once():
    """Do one operator new/delete inside the library (proves the counter is live)."""
    alloc_probe()


_ALLOC_PROBES = {"none": 0, "copy": 1, "string": 2, "malloc": 3, "ostringstream": 4}

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    int RTLD_LAZY

ctypedef void (*_window_begin_t)() noexcept nogil
ctypedef uint64_t (*_window_end_t)() noexcept nogil


def _count_step_allocations(NativeEngine engine, int32_t token, int64_t pos, int n):
    """Heap allocations of the whole process during n decode steps (token fed at pos, then each sampled
    token), counted by a preloaded counter library (tests/malloc_counter.c); the steps run in C between
    its window calls, so nothing of Python's is counted. Returns (count, last token)."""
    cdef void* me = dlopen(NULL, RTLD_LAZY)
    cdef _window_begin_t begin = <_window_begin_t>dlsym(me, "anemll_alloc_window_begin")
    cdef _window_end_t end = <_window_end_t>dlsym(me, "anemll_alloc_window_end")
    if begin == NULL or end == NULL:
        raise RuntimeError("no allocation counter is preloaded (LD_PRELOAD the library of tests/malloc_counter.c)")
    cdef int rc = 0
    cdef int i
    cdef int32_t tok = token
    cdef uint64_t count
    with nogil:
        begin()
        for i in range(n):
            rc = engine.eng.step(tok, pos + i, &tok)
            if rc != 0:
                break
        count = end()
    if rc != 0:
        engine._raise(rc)
    return count, tok


def _view(size_t address, size_t nbytes, dtype, shape, strides=None):
    """A writable numpy view over native memory (no copy); strides in elements (None: dense)."""
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    raw = (ctypes.c_char * nbytes).from_address(address)
    flat = np.frombuffer(raw, dtype=dtype)
    if strides is None:
        return flat.reshape(shape)
    item = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=tuple(s * item for s in strides))


cdef void _write_err(char* err, size_t size, str msg) noexcept:
    cdef bytes data = msg.encode("utf-8", "replace")
    cdef size_t n = len(data)
    if size == 0:
        return
    if n > size - 1:
        n = size - 1
    memcpy(err, <const char*>data, n)
    err[n] = 0


# ------------------------------------------------------------------ backends
cdef class Backend:
    """A native backend handle (see csrc/backends/backend_abi.h)."""
    cdef anemll_backend* be

    def __dealloc__(self):
        if self.be != NULL:
            delete_backend(self.be)
            self.be = NULL

    @property
    def name(self):
        return self.be.name.decode() if self.be != NULL else None

    def _take_pending(self):
        return None

    def buffer_stats(self):
        """Counters of the test backends' own buffers (buffer_row_pad), else None."""
        cdef const HostBuffers* hb = NULL
        if self.be != NULL:
            hb = null_backend_buffers(self.be)
            if hb == NULL:
                hb = callback_backend_buffers(self.be)
        if hb == NULL:
            return None
        return {"row_pad": hb.row_pad, "allocs": hb.allocs, "frees": hb.frees, "maps": hb.maps,
                "unmaps": hb.unmaps, "mapped": hb.mapped}

    cdef int _state_copy(self, anemll_state* state, str name, object array, int write) except -1:
        raise NotImplementedError(f"the {self.name} backend cannot read or write states by name")


cdef int64_t _row_pad(buffer_row_pad) except -2:
    if buffer_row_pad is None:
        return -1
    if int(buffer_row_pad) < 0:
        raise ValueError(f"buffer_row_pad: must be >= 0, got {buffer_row_pad!r}")
    return int(buffer_row_pad)


cdef class NullBackend(Backend):
    """Predictions return at once: measures host overhead. With buffer_row_pad, it also provides the
    tensors passed between models and the logits in its own memory, rows padded by that many elements
    (as the Core ML backend's pixel buffers are)."""

    def __cinit__(self, buffer_row_pad=None):
        self.be = new_null_backend(_row_pad(buffer_row_pad))
        if self.be == NULL:
            raise MemoryError()


cdef class AllocProbeBackend(Backend):
    """Test-only (tests/test_alloc_process.py): the null backend ("none"), one copying outputs it holds in
    padded rows into the bound buffers ("copy"), or one allocating in every predict ("string", "malloc",
    "ostringstream": the negative controls of the allocation counter)."""

    def __cinit__(self, mode="none"):
        if mode not in _ALLOC_PROBES:
            raise ValueError(f"mode: expected one of {list(_ALLOC_PROBES)}, got {mode!r}")
        self.be = new_alloc_probe_backend(_ALLOC_PROBES[mode])
        if self.be == NULL:
            raise MemoryError()


_COMPUTE_UNITS = {"cpu_only": 0, "cpu_and_gpu": 1, "all": 2, "cpu_and_ne": 3}
_OUTPUT_BACKINGS = {"auto": 0, "multiarray": 1, "pixel_buffer": 2, "none": 3}


cdef class CoreMLBackend(Backend):
    """The Objective-C++ Core ML backend (macOS builds only)."""

    def __cinit__(self, compute_units="cpu_and_ne", output_backing="auto", cache_dir=None):
        if compute_units not in _COMPUTE_UNITS:
            raise ValueError(f"compute_units: expected one of {list(_COMPUTE_UNITS)}, got {compute_units!r}")
        if output_backing not in _OUTPUT_BACKINGS:
            raise ValueError(f"output_backing: expected one of {list(_OUTPUT_BACKINGS)}, got {output_backing!r}")
        cdef anemll_coreml_options opts
        cdef char err[1024]
        cdef bytes cache = os.fsencode(cache_dir) if cache_dir is not None else None
        err[0] = 0
        anemll_coreml_options_init(&opts)
        opts.compute_units = _COMPUTE_UNITS[compute_units]
        opts.output_backing = _OUTPUT_BACKINGS[output_backing]
        opts.cache_dir = <const char*>cache if cache is not None else NULL
        self.be = anemll_coreml_backend_create(&opts, err, sizeof(err))
        if self.be == NULL:
            raise RuntimeError(err.decode("utf-8", "replace") or "the Core ML backend could not be created")

    def stats(self):
        """Counters: predictions, outputs written in place or copied, compiles..."""
        cdef anemll_coreml_stats st
        if anemll_coreml_backend_stats(self.be, &st) != 0:
            raise RuntimeError("Core ML backend statistics are unavailable")
        return {
            "predictions": st.predictions, "outputs_in_place": st.outputs_in_place,
            "outputs_copied": st.outputs_copied, "backing_retries": st.backing_retries,
            "backing_fallbacks": st.backing_fallbacks,
            "compiles": st.compiles, "cache_hits": st.cache_hits, "state_resets": st.state_resets,
        }

    cdef int _state_copy(self, anemll_state* state, str name, object array, int write) except -1:
        cdef char err[1024]
        cdef bytes key = name.encode("utf-8")
        cdef int64_t shape[8]
        cdef int32_t rank = array.ndim
        cdef int i
        cdef size_t address = array.ctypes.data
        if rank > 8:
            raise ValueError(f"state {name!r}: rank {rank} exceeds 8")
        for i in range(rank):
            shape[i] = array.shape[i]
        err[0] = 0
        cdef int rc = anemll_coreml_state_copy(self.be, state, key, <void*>address, <size_t>array.nbytes,
                                               _dtype_code(array.dtype), shape, rank, write,
                                               err, sizeof(err))
        if rc != ANEMLL_OK:
            raise RuntimeError(err.decode("utf-8", "replace") or f"state {name!r}: copy failed ({rc})")
        return 0


def coreml_compute_plan(path, function=None, compute_units="cpu_and_ne", cache_dir=None):
    """MLComputePlan of one model file (macOS 14.4+, builds with the Core ML backend): per function, the
    number of operations and their summed estimated cost per device ({"functions": {name: {"ops": {...},
    "cost": {...}}}}, devices neural_engine, gpu, cpu, unassigned). RuntimeError where it cannot run."""
    if compute_units not in _COMPUTE_UNITS:
        raise ValueError(f"compute_units: expected one of {list(_COMPUTE_UNITS)}, got {compute_units!r}")
    cdef bytes p = os.fsencode(path)
    cdef bytes fn = function.encode() if function else None
    cdef bytes cache = os.fsencode(cache_dir) if cache_dir is not None else None
    cdef char err[2048]
    err[0] = 0
    cdef char* out = anemll_coreml_compute_plan(p, <const char*>fn if fn is not None else NULL,
                                                _COMPUTE_UNITS[compute_units],
                                                <const char*>cache if cache is not None else NULL, err, sizeof(err))
    if out == NULL:
        raise RuntimeError(err.decode("utf-8", "replace") or "compute plan: unavailable")
    try:
        text = (<bytes>out).decode("utf-8", "replace")
    finally:
        free(out)
    return json.loads(text)


cdef int _cb_fail(CallbackBackend self, BaseException exc, char* err, size_t err_size, int code) noexcept:
    self.pending = exc
    _write_err(err, err_size, f"{type(exc).__name__}: {exc}")
    return code


cdef int _cb_load(void* user, const char* path, const char* fn, int64_t* model_id,
                  char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        function = fn.decode() if fn != NULL else None
        model = self.target.load(path.decode(), function)
        model_id[0] = self._store(("model", model))
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_LOAD)


cdef int _cb_make_state(void* user, int64_t model_id, int64_t* state_id,
                        char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        model = self.objects[model_id][1]
        state = model.make_state()
        state_id[0] = self._store(["state", model, state])
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_PREDICT)


cdef int _cb_reset_state(void* user, int64_t state_id, char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        entry = self.objects[state_id]
        reset = getattr(entry[2], "reset", None)
        if callable(reset):
            reset()
        else:
            entry[2] = entry[1].make_state()
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_PREDICT)


cdef dict _views(const anemll_tensor* ts, int32_t n):
    cdef dict out = {}
    cdef int32_t i
    for i in range(n):
        shape = tuple(ts[i].shape[k] for k in range(ts[i].rank))
        strides = tuple(ts[i].strides[k] for k in range(ts[i].rank))
        out[ts[i].name.decode()] = _view(<size_t>ts[i].data, ts[i].nbytes, _NP_OF_CODE[ts[i].dtype], shape, strides)
    return out


cdef int _cb_bind(void* user, int64_t model_id, const anemll_tensor* inputs, int32_t n_inputs,
                  const anemll_tensor* outputs, int32_t n_outputs, int64_t* binding_id,
                  char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        model = self.objects[model_id][1]
        binding_id[0] = self._store(("binding", model, _views(inputs, n_inputs), _views(outputs, n_outputs)))
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_INVALID)


cdef int _cb_predict(void* user, int64_t binding_id, int64_t state_id,
                     char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        _, model, inputs, outputs = self.objects[binding_id]
        state = self.objects[state_id][2] if state_id >= 0 else None
        result = model.predict(inputs, state)
        for name, dst in outputs.items():
            try:
                value = result[name]
            except (KeyError, IndexError, TypeError):
                raise KeyError(f"the backend returned no output {name!r} "
                               f"(got {sorted(result) if hasattr(result, 'keys') else type(result).__name__})") from None
            if value is dst:
                continue
            arr = np.asarray(value)
            if arr.shape != dst.shape:
                raise ValueError(f"output {name!r} has shape {list(arr.shape)} but the config declares "
                                 f"{list(dst.shape)}")
            np.copyto(dst, arr, casting="same_kind")
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_PREDICT)


cdef int _cb_copy_state(void* user, int64_t src_id, int64_t dst_id, char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        src, dst = self.objects[src_id][2], self.objects[dst_id][2]
        copy = getattr(dst, "copy_from", None)
        if not callable(copy):
            raise TypeError(f"the backend's states ({type(dst).__name__}) have no copy_from(other) method, "
                            f"needed to switch context sizes")
        copy(src)
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_PREDICT)


def _state_accessors(state):
    """(read(name), write(name, array)) of a Python backend's state: ours
    (read/write) or coremltools' MLState (read_state/write_state)."""
    for r, w in (("read", "write"), ("read_state", "write_state")):
        read, write = getattr(state, r, None), getattr(state, w, None)
        if callable(read) and callable(write):
            return read, write
    raise TypeError(f"{type(state).__name__} has no read(name)/write(name, array) methods, "
                    f"so its buffers cannot be saved or restored")


cdef int _cb_read_state(void* user, int64_t state_id, const char* name, void* dst, size_t nbytes,
                        char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        read, _ = _state_accessors(self.objects[state_id][2])
        arr = np.ascontiguousarray(read(name.decode()))
        if arr.nbytes != nbytes:
            raise ValueError(f"state {name.decode()!r} has {arr.nbytes} bytes, the engine expects {nbytes}")
        _view(<size_t>dst, nbytes, np.uint8, (nbytes,))[:] = arr.reshape(-1).view(np.uint8)
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_PREDICT)


cdef int _cb_write_state(void* user, int64_t state_id, const char* name, const void* src, size_t nbytes,
                         char* err, size_t err_size) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    try:
        read, write = _state_accessors(self.objects[state_id][2])
        like = np.asarray(read(name.decode()))
        if like.nbytes != nbytes:
            raise ValueError(f"state {name.decode()!r} has {like.nbytes} bytes, the engine gives {nbytes}")
        raw = _view(<size_t>src, nbytes, np.uint8, (nbytes,)).copy()
        write(name.decode(), raw.view(like.dtype).reshape(like.shape))
        return ANEMLL_OK
    except BaseException as exc:
        return _cb_fail(self, exc, err, err_size, ANEMLL_ERR_PREDICT)


cdef void _cb_release(void* user, int kind, int64_t obj_id) noexcept with gil:
    cdef CallbackBackend self = <CallbackBackend>user
    self.objects.pop(obj_id, None)


cdef class CallbackBackend(Backend):
    """Forwards to a Python backend: `target.load(path, function_name) -> model`,
    `model.make_state()`, `model.predict(inputs, state) -> {name: array}`.

    Inputs are zero-copy numpy views over the engine's buffers (valid only
    during the call); outputs are copied into the engine's output buffers
    unless the model returns those very views.
    """
    cdef public object target
    cdef public dict objects
    cdef public object pending
    cdef int64_t next_id

    def __cinit__(self, target, buffer_row_pad=None):
        cdef CallbackHooks hooks
        self.target = target
        self.objects = {}
        self.pending = None
        self.next_id = 0
        hooks.user = <void*>self
        hooks.load = _cb_load
        hooks.make_state = _cb_make_state
        hooks.reset_state = _cb_reset_state
        hooks.bind = _cb_bind
        hooks.predict = _cb_predict
        hooks.read_state = _cb_read_state
        hooks.write_state = _cb_write_state
        hooks.release = _cb_release
        hooks.copy_state = _cb_copy_state
        self.be = new_callback_backend(hooks, _row_pad(buffer_row_pad))
        if self.be == NULL:
            raise MemoryError()

    cdef int64_t _store(self, obj):
        self.next_id += 1
        self.objects[self.next_id] = obj
        return self.next_id

    def _take_pending(self):
        exc, self.pending = self.pending, None
        return exc

    cdef int _state_copy(self, anemll_state* state, str name, object array, int write) except -1:
        # The target's state object offers read(name) / write(name, value) (the reference backend's does).
        entry = self.objects.get(callback_handle_id(<const void*>state))
        if entry is None:
            raise RuntimeError("the state was released")
        obj = entry[2]
        try:
            if write:
                obj.write(name, array)
            else:
                np.copyto(array, obj.read(name), casting="same_kind")
        except Exception as exc:  # reported as the Core ML backend reports its failures
            raise RuntimeError(f"{'write' if write else 'read'}_state {name!r}: {exc}") from exc
        return 0


# ------------------------------------------- backends called from Python
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in _NP_OF_CODE.items()}


def _dtype_code(dtype):
    code = _CODE_OF_DTYPE.get(np.dtype(dtype))
    if code is None:
        raise ValueError(f"dtype {np.dtype(dtype)} has no backend type")
    return code


cdef _backend_error(Backend backend, int rc, str what):
    msg = backend.be.last_error(backend.be.ctx).decode("utf-8", "replace") if backend.be != NULL else ""
    exc = RuntimeError(f"{what}: {msg or 'backend error ' + str(rc)}")
    exc.__cause__ = backend._take_pending()
    return exc


cdef class NativeModel:
    """One function of a model file loaded on a native backend, for Python callers that run single
    predictions (the coremltools drop-in): `bind` numpy buffers once, then `predict` on them."""
    cdef readonly Backend backend
    cdef anemll_model* model
    cdef readonly str path
    cdef readonly object function_name

    def __cinit__(self, Backend backend, path, function_name=None):
        if backend is None or backend.be == NULL:
            raise ValueError("backend: expected a live native backend")
        self.backend = backend
        self.path = os.fspath(path)
        self.function_name = function_name
        cdef bytes p = os.fsencode(self.path)
        cdef bytes f = function_name.encode("utf-8") if function_name is not None else None
        cdef int rc = backend.be.load(backend.be.ctx, p, <const char*>f if f is not None else NULL, &self.model)
        if rc != ANEMLL_OK:
            self.model = NULL
            raise _backend_error(backend, rc, f"{self.path}: cannot load function {function_name!r}")

    def __dealloc__(self):
        if self.model != NULL and self.backend is not None and self.backend.be != NULL:
            self.backend.be.free_model(self.backend.be.ctx, self.model)
            self.model = NULL

    def make_state(self):
        """A fresh state (zeros), shareable with other models whose state specs match."""
        cdef NativeState st = NativeState.__new__(NativeState)
        cdef int rc = self.backend.be.make_state(self.backend.be.ctx, self.model, &st.state)
        if rc != ANEMLL_OK:
            st.state = NULL
            raise _backend_error(self.backend, rc, f"{self.path}: make_state")
        st.backend = self.backend
        st.maker = self
        return st

    def bind(self, dict inputs, dict outputs):
        """A binding over these arrays (C-contiguous, kept alive by the binding): predictions read the
        inputs and write the outputs in place."""
        return NativeBinding(self, inputs, outputs)


cdef int _fill_tensor(anemll_tensor* t, bytes name, object arr) except -1:
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name.decode()}: expected a writeable C-contiguous numpy array")
    if arr.ndim > ANEMLL_MAX_RANK:
        raise ValueError(f"{name.decode()}: rank {arr.ndim} exceeds {ANEMLL_MAX_RANK}")
    cdef int k
    cdef int64_t stride = 1
    t.name = name
    t.dtype = _dtype_code(arr.dtype)
    t.rank = arr.ndim
    for k in range(arr.ndim - 1, -1, -1):
        t.shape[k] = arr.shape[k]
        t.strides[k] = stride
        stride *= arr.shape[k]
    t.data = <void*><size_t>arr.ctypes.data
    t.nbytes = arr.nbytes
    return 0


cdef class NativeBinding:
    """Arrays bound to one NativeModel; see NativeModel.bind."""
    cdef readonly NativeModel model
    cdef anemll_binding* binding
    cdef readonly dict inputs
    cdef readonly dict outputs
    cdef list _names

    def __cinit__(self, NativeModel model, dict inputs, dict outputs):
        cdef vector[anemll_tensor] ins
        cdef vector[anemll_tensor] outs
        cdef int i
        self.model = model
        self.inputs = dict(inputs)
        self.outputs = dict(outputs)
        self._names = [n.encode("utf-8") for n in self.inputs] + [n.encode("utf-8") for n in self.outputs]
        ins.resize(len(self.inputs))
        outs.resize(len(self.outputs))
        for i, arr in enumerate(self.inputs.values()):
            _fill_tensor(&ins[i], self._names[i], arr)
        for i, arr in enumerate(self.outputs.values()):
            _fill_tensor(&outs[i], self._names[len(self.inputs) + i], arr)
        cdef Backend be = model.backend
        cdef int rc = be.be.bind(be.be.ctx, model.model, ins.data(), <int32_t>ins.size(), outs.data(),
                                 <int32_t>outs.size(), &self.binding)
        if rc != ANEMLL_OK:
            self.binding = NULL
            raise _backend_error(be, rc, f"{model.path}: bind")

    def __dealloc__(self):
        if self.binding != NULL and self.model is not None:
            self.model.backend.be.free_binding(self.model.backend.be.ctx, self.binding)
            self.binding = NULL

    def predict(self, NativeState state=None):
        """Run on the bound inputs; the bound outputs hold the result. The GIL is released while the
        backend runs (the callback backend takes it back)."""
        cdef Backend be = self.model.backend
        cdef anemll_state* st = NULL
        cdef int rc
        if state is not None:
            if state.backend is not be:
                raise RuntimeError("state: made by another backend (another compute-units setting)")
            st = state.state
        with nogil:
            rc = be.be.predict(be.be.ctx, self.binding, st)
        if rc != ANEMLL_OK:
            raise _backend_error(be, rc, f"{self.model.path}: predict")


cdef class NativeState:
    """A backend state (KV cache) made by NativeModel.make_state."""
    cdef readonly Backend backend
    cdef readonly NativeModel maker
    cdef anemll_state* state

    def __dealloc__(self):
        if self.state != NULL and self.backend is not None and self.backend.be != NULL:
            self.backend.be.free_state(self.backend.be.ctx, self.state)
            self.state = NULL

    def reset(self):
        cdef int rc = self.backend.be.reset_state(self.backend.be.ctx, self.state)
        if rc != ANEMLL_OK:
            raise _backend_error(self.backend, rc, "reset_state")

    def read(self, str name, out):
        """Copy state `name` into `out` (a C-contiguous array of its shape)."""
        if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out: expected a writeable C-contiguous numpy array")
        self.backend._state_copy(self.state, name, out, 0)
        return out

    def write(self, str name, value):
        """Copy `value` (a C-contiguous array of the state's shape) into state `name`."""
        arr = np.ascontiguousarray(value)
        self.backend._state_copy(self.state, name, arr, 1)


# ---------------------------------------------------------------- samplers
cdef SamplerConfig _sampler_config(dict s) except *:
    cdef SamplerConfig cfg
    cfg.temperature = s.get("temperature", 0.0)
    cfg.top_k = s.get("top_k", 0)
    cfg.top_p = s.get("top_p", 1.0)
    cfg.min_p = s.get("min_p", 0.0)
    cfg.repetition_penalty = s.get("repetition_penalty", 1.0)
    cfg.presence_penalty = s.get("presence_penalty", 0.0)
    cfg.frequency_penalty = s.get("frequency_penalty", 0.0)
    window = s.get("penalty_window", 64)
    cfg.penalty_window = -1 if window is None else window
    for tok, val in (s.get("logit_bias") or {}).items():
        cfg.bias_tokens.push_back(tok)
        cfg.bias_values.push_back(val)
    seed = s.get("seed")
    cfg.seed = 0 if seed is None else (<uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF))
    n = s.get("logprobs")
    cfg.top_logprobs = -1 if n is None else n
    return cfg


cdef _parts_of(list arrays, vector[LogitsPart]& parts):
    cdef LogitsPart p
    cdef int64_t offset = 0
    for a in arrays:
        if not (isinstance(a, np.ndarray) and a.dtype == np.float16 and a.flags.c_contiguous
                and a.flags.writeable):
            raise ValueError("logits parts must be writable C-contiguous float16 arrays")
        p.data = <uint16_t*><size_t>a.ctypes.data
        p.size = a.size
        p.offset = offset
        offset += a.size
        parts.push_back(p)
    return offset


cdef size_t _mask_address(words, int64_t n_bits) except? 0:
    """The address of a token mask's words (bit t%32 of word t//32: token t allowed)."""
    if not (isinstance(words, np.ndarray) and words.ndim == 1 and words.dtype in (np.int32, np.uint32)
            and words.flags.c_contiguous):
        raise ValueError("token mask: expected a 1-D C-contiguous int32 or uint32 numpy array")
    if n_bits <= 0:
        raise ValueError(f"token mask: n_bits must be > 0, got {n_bits}")
    if words.size * 32 < n_bits:
        raise ValueError(f"token mask: {words.size} words hold {words.size * 32} bits, fewer than n_bits={n_bits}")
    return <size_t>words.ctypes.data


cdef class NativeSampler:
    """The engine's sampler on its own, over given fp16 logits parts (for tests)."""
    cdef Sampler s
    cdef int64_t vocab
    cdef object mask  # keeps the token mask's words alive while the sampler points at them

    def __init__(self, int64_t vocab_size, dict settings, int64_t max_history=4096):
        cdef string err = self.s.configure(_sampler_config(settings), vocab_size, max_history)
        if err.size():
            raise ValueError(err.decode())
        self.vocab = vocab_size

    def sample(self, list parts, history=()):
        cdef vector[LogitsPart] ps
        if _parts_of(parts, ps) != self.vocab:
            raise ValueError("logits parts do not cover the vocabulary")
        hist = np.ascontiguousarray(np.asarray(history, dtype=np.int32))
        cdef int32_t token = -1
        cdef int rc = self.s.sample(ps.data(), <int>ps.size(), <const int32_t*><size_t>hist.ctypes.data,
                                    hist.size, &token)
        if rc != 0:
            raise ValueError(self.s.error().decode())
        return token

    def set_token_mask(self, words, int64_t n_bits=-1):
        """Allow only the tokens whose bit is set (None: no mask); see NativeEngine.set_token_mask."""
        if words is None:
            self.s.set_token_mask(NULL, 0)
            self.mask = None
            return
        if n_bits < 0:
            n_bits = words.size * 32 if isinstance(words, np.ndarray) else 0
        cdef size_t address = _mask_address(words, n_bits)
        self.s.set_token_mask(<const uint32_t*>address, n_bits)
        self.mask = words

    @property
    def candidates(self):
        """Tokens the last stochastic draw weighed after its cuts (stale after a greedy sample)."""
        return self.s.candidates()

    def logprobs(self):
        """(chosen logprob, [(id, logprob), ...]) of the last sample."""
        return self.s.chosen_logprob, [(self.s.top_ids[i], self.s.top_logprobs[i]) for i in range(self.s.n_top)]

    def bench(self, list parts, history, int64_t reps):
        """Nanoseconds of each of `reps` samples over the same parts, timed natively (anemll_fast.bench)."""
        cdef vector[LogitsPart] ps
        if _parts_of(parts, ps) != self.vocab:
            raise ValueError("logits parts do not cover the vocabulary")
        if reps < 1:
            raise ValueError(f"reps: must be >= 1, got {reps}")
        hist = np.ascontiguousarray(np.asarray(history, dtype=np.int32))
        ns = np.zeros(reps, np.int64)
        cdef int64_t* out = <int64_t*><size_t>ns.ctypes.data
        cdef const int32_t* h = <const int32_t*><size_t>hist.ctypes.data
        cdef int64_t hn = hist.size
        cdef int32_t token = -1
        cdef int rc
        with nogil:
            rc = bench_sampler(self.s, ps.data(), <int>ps.size(), h, hn, reps, out, &token)
        if rc != 0:
            raise ValueError(self.s.error().decode())
        return ns


def bench_read_floor(list parts, int64_t reps):
    """Nanoseconds of each of `reps` reads of every fp16 entry of the parts: a sampler's bandwidth floor."""
    cdef vector[LogitsPart] ps
    _parts_of(parts, ps)
    if reps < 1:
        raise ValueError(f"reps: must be >= 1, got {reps}")
    ns = np.zeros(reps, np.int64)
    cdef int64_t* out = <int64_t*><size_t>ns.ctypes.data
    with nogil:
        bench_read_parts(ps.data(), <int>ps.size(), reps, out)
    return ns


def monotonic_clock_ns():
    """The clock the engine's timing counters and bench loops read (for comparing with them)."""
    return monotonic_ns()


def argmax_fp16(list parts):
    """Index of the largest entry across fp16 parts, read in place (-1 if none)."""
    cdef vector[LogitsPart] ps
    _parts_of(parts, ps)
    return argmax_parts(ps.data(), <int>ps.size())


# ------------------------------------------------------------------- engine
cdef ComponentDesc _component(dict c) except *:
    cdef ComponentDesc out
    cdef TensorDesc t
    out.label = c["label"].encode()
    out.path = str(c["path"]).encode()
    out.function = (c.get("function") or "").encode()
    for kind in ("inputs", "outputs", "states"):
        for name, dtype, shapes in c[kind]:
            t.name = name.encode()
            t.dtype = DTYPE_CODES[dtype]
            t.shapes.clear()
            for shape in shapes:
                t.shapes.push_back([int(d) for d in shape])
            if kind == "inputs":
                out.inputs.push_back(t)
            elif kind == "outputs":
                out.outputs.push_back(t)
            else:
                out.states.push_back(t)
    return out


cdef class NativeEngine:
    """The C++ pipeline. `desc` is the plain dict built by anemll_fast.engine."""
    cdef Engine* eng
    cdef readonly Backend backend
    cdef object mask  # keeps the token mask's words alive while the sampler points at them

    def __cinit__(self, dict desc, Backend backend):
        cdef PipelineDesc d
        cdef int rc
        self.backend = backend
        d.batch_size = desc["batch_size"]
        d.context_length = desc["context_length"]
        d.hidden_size = desc["hidden_size"]
        d.vocab_size = desc["vocab_size"]
        d.monolithic = bool(desc.get("monolithic", False))
        if not d.monolithic:
            d.embeddings = _component(desc["embeddings"])
            d.lm_head = _component(desc["lm_head"])
        for c in desc["ffn_prefill"]:
            d.ffn_prefill.push_back(_component(c))
        for c in desc["ffn_infer"]:
            d.ffn_infer.push_back(_component(c))
        for c in desc.get("ffn_infer_rotate") or ():
            d.ffn_infer_rotate.push_back(_component(c))
        d.sliding_window = int(desc.get("sliding_window") or 0)
        cdef ContextFunctions cf
        for level in desc.get("smaller_contexts") or ():
            cf.context_length = level["context_length"]
            cf.ffn_prefill.clear()
            cf.ffn_infer.clear()
            cf.ffn_infer_rotate.clear()
            for c in level.get("ffn_prefill") or ():
                cf.ffn_prefill.push_back(_component(c))
            for c in level.get("ffn_infer") or ():
                cf.ffn_infer.push_back(_component(c))
            for c in level.get("ffn_infer_rotate") or ():
                cf.ffn_infer_rotate.push_back(_component(c))
            d.smaller_contexts.push_back(cf)
        for name in desc["logits_outputs"]:
            d.logits_outputs.push_back(name.encode())
        for size in desc.get("part_sizes") or ():
            d.part_sizes.push_back(size)
        d.sequential_prefill = bool(desc.get("sequential_prefill", False))
        d.valid_vocab = desc.get("valid_vocab") or 0
        self.eng = new Engine(backend.be)
        rc = self.eng.init(d)
        if rc != 0:
            self._raise(rc)

    def __dealloc__(self):
        if self.eng != NULL:
            del self.eng
            self.eng = NULL

    def _raise(self, int rc):
        from anemll_fast.engine import EngineError, EngineInputError
        from anemll_fast.errors import ConfigError
        msg = self.eng.error().decode("utf-8", "replace")
        cause = self.backend._take_pending()
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise cause
        cls = {STATUS_INVALID_ARGUMENT: EngineInputError, STATUS_CONFIG_ERROR: ConfigError}.get(rc, EngineError)
        raise cls(msg) from cause

    def reset(self):
        cdef int rc
        with nogil:
            rc = self.eng.reset()
        if rc != 0:
            self._raise(rc)

    def prefill(self, tokens, int64_t start=0, bint one_by_one=False):
        """Write the KV cache for tokens from `start`; `one_by_one`: through infer, as decode steps do."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if ids.ndim != 1:
            raise ValueError("tokens: expected a 1-D sequence of token ids")
        cdef const int32_t* ptr = <const int32_t*><size_t>ids.ctypes.data
        cdef int64_t n = ids.size
        cdef int rc
        with nogil:
            rc = self.eng.replay(ptr, n, start) if one_by_one else self.eng.prefill(ptr, n, start)
        if rc != 0:
            self._raise(rc)

    def step(self, int32_t token, int64_t pos):
        """Feed `token` at `pos`; returns the next token. Runs without the GIL."""
        cdef int32_t nxt = -1
        cdef int rc
        with nogil:
            rc = self.eng.step(token, pos, &nxt)
        if rc != 0:
            self._raise(rc)
        return nxt

    def configure_sampler(self, dict settings):
        cdef SamplerConfig cfg = _sampler_config(settings)
        cdef int rc = self.eng.configure_sampler(cfg)
        if rc != 0:
            self._raise(rc)

    def sampler_rng_state(self):
        """The sampler's RNG position (bytes), for set_sampler_rng_state."""
        return self.eng.sampler_rng_state()

    def set_sampler_rng_state(self, bytes state):
        cdef int rc = self.eng.set_sampler_rng_state(state)
        if rc != 0:
            self._raise(rc)
    def set_token_mask(self, words, int64_t n_bits=-1):
        """Allow only the tokens whose bit is set in `words` (bit t%32 of word t//32)
        from the next step on; tokens at or past n_bits (default: all the words' bits)
        are never sampled. The sampler reads `words` in place at every step, so a
        grammar rewrites them between steps with no call here. None removes the mask."""
        cdef int rc
        if words is None:
            rc = self.eng.set_token_mask(NULL, 0)
            self.mask = None
            return
        if n_bits < 0:
            n_bits = words.size * 32 if isinstance(words, np.ndarray) else 0
        cdef size_t address = _mask_address(words, n_bits)
        rc = self.eng.set_token_mask(<const uint32_t*>address, n_bits)
        if rc != 0:
            self._raise(rc)
        self.mask = words

    def last_logprobs(self):
        """(chosen logprob, [(id, logprob), ...]) of the last step, when requested."""
        cdef const Sampler* s = &self.eng.sampler()
        return s.chosen_logprob, [(s.top_ids[i], s.top_logprobs[i]) for i in range(s.n_top)]

    def logits(self):
        """A copy of the last step's logits, concatenated (for inspection, not the hot path)."""
        cdef const LogitsPart* ps
        cdef int rc = self.eng.map_logits()
        if rc != 0:
            self._raise(rc)
        try:
            ps = self.eng.parts()
            out = []
            for i in range(self.eng.n_parts()):
                out.append(_view(<size_t>ps[i].data, ps[i].size * 2, np.float16, (ps[i].size,)).copy())
        finally:
            self.eng.unmap_logits()
        return np.concatenate(out) if out else np.zeros(0, np.float16)

    @property
    def backend_buffers(self):
        """How many of the engine's tensors live in backend memory (alloc_buffer)."""
        return self.eng.backend_buffers()

    def logits_views(self):
        """Writable zero-copy views of the logits parts (tests and debugging only; with logits in
        backend memory they point where the sampler last read them)."""
        cdef const LogitsPart* ps = self.eng.parts()
        return [_view(<size_t>ps[i].data, ps[i].size * 2, np.float16, (ps[i].size,))
                for i in range(self.eng.n_parts())]

    @property
    def length(self):
        return self.eng.length()

    @property
    def valid_vocab(self):
        """Ids below this are sampled and accepted; the rest of the vocabulary is masked."""
        return self.eng.valid_vocab()

    @property
    def history(self):
        cdef int64_t n = self.eng.length()
        return _view(<size_t>self.eng.history(), n * 4, np.int32, (n,)).copy()

    @property
    def prefill_mode(self):
        return self.eng.prefill_mode().decode()

    @property
    def argmax_head(self):
        return bool(self.eng.argmax_head())

    @property
    def state_count(self):
        return self.eng.state_count()

    def state_tensors(self):
        """[(state index, name, dtype code, shape, nbytes)] of the KV-cache states."""
        return [(t.state, t.name.decode(), t.dtype, tuple(t.shape), t.nbytes) for t in self.eng.state_tensors()]

    @property
    def can_access_states(self):
        return bool(self.eng.can_access_states())

    def read_state(self, size_t i, out):
        """Copy state tensor i into `out` (a C-contiguous array of exactly its size)."""
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out: expected a writable C-contiguous array")
        cdef size_t ptr = out.ctypes.data
        cdef size_t n = out.nbytes
        cdef int rc
        with nogil:
            rc = self.eng.read_state(i, <void*>ptr, n)
        if rc != 0:
            self._raise(rc)

    def write_state(self, size_t i, data):
        """Copy `data` (C-contiguous, exactly the tensor's size) into state tensor i."""
        arr = np.ascontiguousarray(data)
        cdef size_t ptr = arr.ctypes.data
        cdef size_t n = arr.nbytes
        cdef int rc
        with nogil:
            rc = self.eng.write_state(i, <const void*>ptr, n)
        if rc != 0:
            self._raise(rc)

    def set_history(self, tokens):
        """Declare which tokens the (restored) KV cache holds."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        cdef const int32_t* ptr = <const int32_t*><size_t>ids.ctypes.data
        cdef int rc = self.eng.set_history(ptr, ids.size)
        if rc != 0:
            self._raise(rc)

    def set_active_context(self, int64_t ctx):
        """Which context size's states hold the (restored) KV cache (models with functions per size)."""
        cdef int rc = self.eng.set_active_context(ctx)
        if rc != 0:
            self._raise(rc)

    @property
    def counters(self):
        return {"embed": self.eng.embed_calls, "prefill": self.eng.prefill_calls,
                "infer": self.eng.infer_calls, "head": self.eng.head_calls}

    @property
    def schedule_counters(self):
        """infer_rotate calls (sliding-window models), rebuilds of a rotated cache after a rewind, and context
        switches (models with functions per context size)."""
        return {"infer_rotate": self.eng.infer_rotate_calls, "cache_rebuilds": self.eng.cache_rebuilds,
                "context_switches": self.eng.context_switches}

    @property
    def active_context(self):
        return self.eng.active_context()

    # ------------------------------------------------------------ benchmarks
    def set_timing(self, bint on):
        """Per-part timing of decode steps on or off (off by default; it reads the clock a few times a step)."""
        self.eng.set_timing(on)

    @property
    def timing(self):
        return bool(self.eng.timing())

    def reset_timing(self):
        self.eng.reset_timing()

    def timing_counters(self):
        """Seconds spent in each part over the decode steps timed since reset_timing: embeddings, each FFN
        chunk, LM head, sampler, and host (the engine's own work: the rest of each step), with the total."""
        cdef const StepTiming* t = &self.eng.timing_counters()
        chunks = [t.chunk_ns[i] * 1e-9 for i in range(t.chunk_ns.size())]
        total = t.total_ns * 1e-9
        parts = t.embed_ns * 1e-9 + sum(chunks) + t.head_ns * 1e-9 + t.sample_ns * 1e-9
        return {"steps": t.steps, "total": total, "embeddings": t.embed_ns * 1e-9, "chunks": chunks,
                "lm_head": t.head_ns * 1e-9, "sampler": t.sample_ns * 1e-9, "host": total - parts}

    def bench_decode(self, int32_t token, int64_t pos, int64_t n):
        """n decode steps from (token, pos), each fed the token the previous one produced, timed natively:
        (tokens produced, nanoseconds of each step)."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        tokens = np.full(n, -1, np.int32)
        ns = np.zeros(n, np.int64)
        cdef int32_t* tp = <int32_t*><size_t>tokens.ctypes.data
        cdef int64_t* np_ = <int64_t*><size_t>ns.ctypes.data
        cdef int64_t done = 0
        cdef int rc
        with nogil:
            rc = bench_decode(self.eng[0], token, pos, n, tp, np_, &done)
        if rc != 0:
            self._raise(rc)
        return tokens, ns

    def bench_prefill(self, tokens, int64_t reps):
        """`reps` times from an empty cache: prefill of the prompt but its last token, then the step giving the
        first new token. (prefill ns, time-to-first-token ns, first token)."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if ids.ndim != 1 or ids.size < 1:
            raise ValueError("tokens: expected a non-empty 1-D sequence of token ids")
        if reps < 1:
            raise ValueError(f"reps: must be >= 1, got {reps}")
        pre = np.zeros(reps, np.int64)
        first = np.zeros(reps, np.int64)
        cdef const int32_t* ip = <const int32_t*><size_t>ids.ctypes.data
        cdef int64_t n = ids.size
        cdef int64_t* pp = <int64_t*><size_t>pre.ctypes.data
        cdef int64_t* fp = <int64_t*><size_t>first.ctypes.data
        cdef int32_t tok = -1
        cdef int rc
        with nogil:
            rc = bench_prefill(self.eng[0], ip, n, reps, pp, fp, &tok)
        if rc != 0:
            self._raise(rc)
        return pre, first, tok

    def function_at(self, int64_t pos):
        """The FFN function a single token at `pos` runs through, whether a prefill batch may start there, and
        the context size whose functions serve it (from the current one up)."""
        return self.eng.infer_function(pos).decode(), bool(self.eng.batch_prefill_at(pos)), self.eng.context_at(pos)
