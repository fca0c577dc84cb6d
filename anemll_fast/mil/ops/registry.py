"""Op registry and the build-time context an op builder sees.

An op builder runs once, when a function is compiled into a plan. It reads the op's constant
parameters (axes, flags, weights) through the context, bakes them into a kernel closure and says
which runtime operands the kernel takes. Kernels compute on float32 (or integer/bool) arrays; the
plan rounds outputs to their declared dtype afterwards.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from anemll_fast.mil.errors import MilFormatError, UnsupportedOpError
from anemll_fast.mil.program import FLOAT_DTYPES, NUMPY_DTYPES, Op, TensorType, Value

_MISSING = object()


@dataclass
class Kernel:
    """fn(*operands) -> output (or tuple of outputs); operands are the resolved `args` handles.

    exact: the kernel only moves or selects values (reshape, slice, gather...), so its outputs need
    no rounding to the declared float dtype. inplace_arg: index into args of an operand the kernel
    may overwrite when the plan proves nobody reads it afterwards (fn then takes a keyword `inplace`).
    pure: the same operands always give the same result, so constant operands may be folded at
    build time (random_* ops are not pure).
    """

    fn: Callable[..., Any]
    args: List[Any]
    exact: bool = False
    inplace_arg: Optional[int] = None
    pure: bool = True


Builder = Callable[["BuildContext"], Kernel]
OPS: Dict[str, Builder] = {}


def register(*names: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def compute_form(value: Value) -> Any:
    """Constant storage -> what kernels compute on: floats as float32, others unchanged."""
    data = value.data
    if isinstance(data, np.ndarray):
        if value.dtype in FLOAT_DTYPES:
            return data.astype(np.float32)
        return data
    return data


try:  # the native kernels are optional: without them every op runs on numpy/BLAS
    from anemll_fast._kernels import PackedWeight
    from anemll_fast._kernels import round_fp16
except ImportError:  # pragma: no cover - a build without the extension
    PackedWeight = None

    def round_fp16(r: Any) -> np.ndarray:
        """r rounded to fp16 precision, as a new float32 array."""
        return np.asarray(r, dtype=np.float16).astype(np.float32)


class Stored:
    """A constant kept in its stored form until an op asks for it.

    `value()` is the compute form (float32 for floats), made on first use and shared by every
    function that holds this object; ops with native kernels ask for `packed()` instead (fp16 bits
    or palette indices with per-row-group tables), so a weight is never expanded to float32 at all.
    """

    __slots__ = ("_make", "_cf", "storage", "_packed")

    def __init__(self, make: Callable[[], Any], storage: Optional[Tuple] = None):
        self._make = make
        self._cf: Any = None
        self.storage = storage  # ("fp16", array) | ("palette", indices, lut[groups, entries], nbits)
        self._packed: Any = None

    def value(self) -> Any:
        if self._make is not None:
            self._cf = self._make()
            self._make = None
        return self._cf

    @property
    def shape(self) -> Tuple[int, ...]:
        if self.storage is None:
            return tuple(np.shape(self.value()))
        return tuple(self.storage[1].shape)

    def packed(self) -> Any:
        """A PackedWeight over [shape[0], prod(shape[1:])], or None when there is no native form."""
        if self._packed is None and self.storage is not None and PackedWeight is not None:
            kind, data = self.storage[0], self.storage[1]
            rows = data.shape[0]
            if kind == "fp16":
                self._packed = PackedWeight.from_f16(data.reshape(rows, -1))
            else:
                self._packed = PackedWeight.from_palette(data.reshape(rows, -1), self.storage[2],
                                                         self.storage[3])
                if self.storage[3] <= 4:  # the kernel holds its own nibble-packed copy
                    release_mapped_pages(data)
        return self._packed


def release_mapped_pages(a: np.ndarray) -> bool:
    """Let the pages of `a` leave this process's resident memory, when `a` is a view of a read-only
    file mapping (the program cache maps one-byte palette indices that way): they stay in the page
    cache and come back from the file if read again (the dense fallback). Anything else is left
    alone (dropping the pages of anonymous or writable memory would lose data); True if released."""
    owner = a
    while owner is not None and not isinstance(owner, np.memmap):  # views keep their base alive
        owner = owner.base if isinstance(owner, np.ndarray) else None
    mm = getattr(owner, "_mmap", None) if owner is not None and owner.mode == "r" else None
    if mm is None or a.nbytes < mmap.PAGESIZE:
        return False
    start = np.frombuffer(mm, np.uint8, count=1).ctypes.data  # where the mapping begins
    lo = a.ctypes.data - start
    first = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside a only
    last = (lo + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first or not a.flags.c_contiguous:
        return False
    mm.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True


def unwrap(v: Any) -> Any:
    return v.value() if isinstance(v, Stored) else v


class BindingRef:
    """Handle for one operand binding (var name or inline constant), resolved to a slot by the plan."""

    __slots__ = ("binding",)

    def __init__(self, binding: Any):
        self.binding = binding


class BuildContext:
    """What an op builder may ask about its op; constants come from `consts` (compute form)."""

    def __init__(self, op: Op, function: str, source: str, consts: Dict[str, Any],
                 types: Dict[str, Any]):
        self.op = op
        self.function = function
        self.source = source
        self._consts = consts
        self._types = types

    # -- naming for errors
    @property
    def label(self) -> str:
        out = self.op.outputs[0].name if self.op.outputs else self.op.name
        return f"{self.source}: function {self.function!r}, op {self.op.type} ({out})"

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.label}: {what} is not supported")

    def bad(self, what: str) -> MilFormatError:
        return MilFormatError(f"{self.label}: {what}")

    # -- parameters
    def has(self, name: str) -> bool:
        if name in self.op.inputs and len(self.op.inputs[name]) > 0:
            return True
        return name != "name" and name in self.op.attributes

    def _binding(self, name: str) -> Any:
        binds = self.op.inputs.get(name)
        if not binds and name != "name" and name in self.op.attributes:
            return self.op.attributes[name]  # iOS16 constexpr ops keep their data as attributes
        if not binds:
            raise self.bad(f"missing input {name!r}")
        if len(binds) != 1:
            raise self.bad(f"input {name!r} takes one value, got {len(binds)}")
        return binds[0]

    def is_const(self, name: str) -> bool:
        if not self.has(name):
            return False
        b = self._binding(name)
        return isinstance(b, Value) or b in self._consts

    def const(self, name: str, default: Any = _MISSING) -> Any:
        if not self.has(name):
            if default is _MISSING:
                raise self.bad(f"missing input {name!r}")
            return default
        b = self._binding(name)
        if isinstance(b, Value):
            return compute_form(b)
        if b in self._consts:
            return unwrap(self._consts[b])
        raise self.unsupported(f"a non-constant {name!r} ({b})")

    def stored(self, name: str) -> Optional[Stored]:
        """The Stored form of a constant input (for ops with native kernels), else None."""
        if not self.has(name):
            return None
        b = self._binding(name)
        if isinstance(b, Value):
            return None
        v = self._consts.get(b)
        return v if isinstance(v, Stored) and v.storage is not None else None

    def scalar(self, name: str, default: Any = _MISSING) -> Any:
        v = self.const(name, default)
        if isinstance(v, np.ndarray):
            if v.size != 1:
                raise self.bad(f"input {name!r} must be a scalar, got shape {list(v.shape)}")
            return v.reshape(()).item()
        return v

    def ints(self, name: str, default: Any = _MISSING) -> Any:
        v = self.const(name, default)
        if v is None:
            return None
        return [int(i) for i in np.asarray(v).reshape(-1).tolist()]  # (Python scalars: 3x faster to walk)

    def const_tuple(self, name: str) -> List[Any]:
        """A tuple input whose members are all constants (e.g. reshape_like's begins)."""
        binds = self.op.inputs.get(name)
        if not binds:
            raise self.bad(f"missing input {name!r}")
        out = []
        for b in binds:
            if isinstance(b, Value):
                out.append(compute_form(b))
            elif b in self._consts:
                out.append(unwrap(self._consts[b]))
            else:
                raise self.unsupported(f"a non-constant member of {name!r} ({b})")
        return out

    def ref(self, name: str) -> BindingRef:
        return BindingRef(self._binding(name))

    def refs(self, name: str) -> List[BindingRef]:
        binds = self.op.inputs.get(name)
        if not binds:
            raise self.bad(f"missing input {name!r}")
        return [BindingRef(b) for b in binds]

    def in_type(self, name: str) -> Any:
        b = self._binding(name)
        if isinstance(b, Value):
            return b.type
        return self._types.get(b)

    def in_dtype(self, name: str) -> str:
        t = self.in_type(name)
        if isinstance(t, TensorType):
            return t.dtype
        return getattr(getattr(t, "wrapped", None), "dtype", "")

    @property
    def out_types(self) -> Sequence[Any]:
        return [v.type for v in self.op.outputs]

    def out_dtype(self, i: int = 0) -> str:
        t = self.op.outputs[i].type
        return t.dtype if isinstance(t, TensorType) else ""

    def out_numpy(self, i: int = 0) -> Any:
        return NUMPY_DTYPES.get(self.out_dtype(i), np.float32)

    def axis(self, a: int, rank: int) -> int:
        if not -rank <= a < max(rank, 1):
            raise self.bad(f"axis {a} out of range for rank {rank}")
        return a % rank if rank else 0

    def in_rank(self, name: str) -> Optional[int]:
        t = self.in_type(name)
        if isinstance(t, TensorType) and t.shape is not None:
            return len(t.shape)
        return None


def f32(x: Any) -> np.ndarray:
    """Runtime operand as a float32 array (no copy when it already is one)."""
    return np.asarray(x, dtype=np.float32)
