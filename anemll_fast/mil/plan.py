"""Compile one MIL function into a flat execution plan.

At build time: constants and constexpr weights are decoded (once) and folded, every variable gets an
integer slot, each op becomes a closure over its baked parameters that reads and writes slots, and
each output gets a finisher rounding it to its declared dtype (fp16 stays fp16-exact between ops,
held in float32 arrays so that numpy/BLAS compute in float32). At run time the plan only copies the
slot template and calls the step closures in order: no graph walking, no lookups by name.

In-place slice_update: when the updated tensor (or the state it was read from) is provably never
read again except through the update, the kernel writes into it instead of copying. This is what
keeps a KV-cache update O(update) instead of O(cache).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from anemll_fast.mil.blobfile import fp32_to_bf16_bits, bf16_to_fp32
from anemll_fast.mil import fusion
from anemll_fast.mil.attention import fuse as fuse_attention
from anemll_fast.mil.liveness import dead_after, with_release
from anemll_fast.mil.errors import MilError, MilFormatError, MilRuntimeError, UnsupportedOpError
from anemll_fast.mil.ops import CONSTEXPR, CONTROL_FLOW, OPS, SUPPORTED_OPS
from anemll_fast.mil.ops.registry import (BindingRef, BuildContext, Kernel, Stored, compute_form, round_fp16,
                                          unwrap)
from anemll_fast.mil.program import (
    NUMPY_DTYPES, Block, Function, OtherType, Program, StateType, TensorType, Value, Var,
)

_F32 = np.float32
_F16 = np.float16
# Ops whose kernel may return a view of (or the very object of) its first operand.
_VIEW_OPS = frozenset({"identity", "reshape", "transpose", "expand_dims", "squeeze", "slice_by_index",
                       "slice_by_size", "split", "read_state", "coreml_update_state", "cast",
                       "reshape_run", "view_run"})
_STATE_OPS = frozenset({"read_state", "write_state", "coreml_update_state"})
_WRITE_STATE = {"write_state": ("input", "data"), "coreml_update_state": ("state", "value")}


# A while_loop that has not ended after this many iterations is reported, not run forever.
MAX_LOOP_ITERATIONS = 10_000_000


def _all_ops(ops: Sequence[Any]):
    for op in ops:
        yield op
        for b in op.blocks:
            yield from _all_ops(b.ops)


def _op_types(ops: Sequence[Any]) -> set:
    types = {op.type for op in ops}
    for op in ops:
        for b in op.blocks:  # few ops have blocks: no generator over every op
            types |= _op_types(b.ops)
    return types


def unsupported_ops(fn: Function) -> List[str]:
    return sorted(_op_types(fn.ops) - SUPPORTED_OPS)


def _block_uses(block: Block) -> List[str]:
    """Names a block reads from outside itself (its ops' and nested blocks' free variables, in order)."""
    defined = {v.name for v in block.inputs}
    used: List[str] = []

    def note(name: str) -> None:
        if name not in defined and name not in used:
            used.append(name)

    for op in block.ops:
        for binds in op.inputs.values():
            for b in binds:
                if isinstance(b, str):
                    note(b)
        for nested in op.blocks:
            for name in _block_uses(nested):
                note(name)
        defined.update(v.name for v in op.outputs)
    for o in block.outputs:
        note(o)
    return used


def check_supported(program: Program) -> None:
    """Raise UnsupportedOpError naming every unknown op, its function and the file."""
    problems = []
    for name, fn in program.functions.items():
        bad = unsupported_ops(fn)
        if bad:
            problems.append(f"function {name!r}: {', '.join(bad)}")
    if problems:
        raise UnsupportedOpError(
            f"{program.source}: ops not implemented by the reference backend: " + "; ".join(problems)
        )


_FINISHERS: Dict[Tuple[str, bool], Callable[[Any], Any]] = {}


def round_to(dtype: str, exact: bool) -> Callable[[Any], Any]:
    """Finisher mapping a kernel result to the compute form of `dtype` (one per kind, shared by every step)."""
    fin = _FINISHERS.get((dtype, exact))
    if fin is None:
        fin = _FINISHERS[(dtype, exact)] = _make_finisher(dtype, exact)
    return fin


def _make_finisher(dtype: str, exact: bool) -> Callable[[Any], Any]:
    if dtype == "fp16":
        if exact:
            return _as_f32
        return round_fp16
    if dtype in ("fp32", "fp64"):
        return _as_f32
    if dtype == "bf16":
        return lambda r: bf16_to_fp32(fp32_to_bf16_bits(np.asarray(r, dtype=_F32)))
    target = NUMPY_DTYPES.get(dtype)
    if target is None or target is object:
        return lambda r: r
    target = np.dtype(target)

    def to_int(r):
        if type(r) is np.ndarray and r.dtype == target:
            return r
        return np.asarray(r).astype(target)

    return to_int


def _as_f32(r: Any) -> np.ndarray:
    if type(r) is np.ndarray and r.dtype == _F32:
        return r
    return np.asarray(r, dtype=_F32)


def to_compute(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A user/stored array in the form kernels compute on (copy for floats)."""
    if dtype in ("fp16", "fp32", "fp64"):
        return np.array(arr, dtype=_F32)
    if dtype == "bf16":
        return bf16_to_fp32(fp32_to_bf16_bits(np.asarray(arr, dtype=_F32)))
    return np.asarray(arr, dtype=NUMPY_DTYPES[dtype])


def from_compute(arr: Any, dtype: str) -> np.ndarray:
    """A computed value as a fresh array of its declared dtype (what callers receive)."""
    target = NUMPY_DTYPES.get(dtype, _F32)
    if dtype == "bf16":
        target = _F32
    return np.array(arr, dtype=target, copy=True)


class FusionRecords(Protocol):
    """Fusion outcomes of one program's functions, by function name (see fusion.fuse's `record`)."""

    def get(self, function_name: str) -> Optional[Dict[str, Any]]: ...

    def put(self, function_name: str, record: Dict[str, Any]) -> None: ...


class _Step:
    __slots__ = ("run", "op_type", "out_name")

    def __init__(self, run: Callable[[list], None], op_type: str, out_name: str):
        self.run = run
        self.op_type = op_type
        self.out_name = out_name


def _make_step(fn: Callable, ins: Tuple[int, ...], outs: Tuple[int, ...],
               fins: Tuple[Callable, ...], inplace: bool) -> Callable[[list], None]:
    """Specialised closures for the common arities: the inner loop is just `step(env)`."""
    if inplace:
        def run_inplace(env):
            r = fn(*[env[i] for i in ins], inplace=True)
            env[outs[0]] = fins[0](r)
        return run_inplace
    if len(outs) == 1:
        o, f = outs[0], fins[0]
        if len(ins) == 1:
            a = ins[0]

            def run1(env):
                env[o] = f(fn(env[a]))
            return run1
        if len(ins) == 2:
            a, b = ins

            def run2(env):
                env[o] = f(fn(env[a], env[b]))
            return run2

        def run_n(env):
            env[o] = f(fn(*[env[i] for i in ins]))
        return run_n
    if not outs:
        def run0(env):
            fn(*[env[i] for i in ins])
        return run0

    def run_multi(env):
        rs = fn(*[env[i] for i in ins])
        for o, f, r in zip(outs, fins, rs):
            env[o] = f(r)
    return run_multi


class Plan:
    """A compiled function: run(inputs, states) -> outputs, all positional by declared order."""

    def __init__(self, program: Program, function_name: Optional[str] = None,
                 const_cache: Optional[Dict[int, Tuple[Any, Any]]] = None, fuse: Optional[bool] = None,
                 fusion_records: Optional[FusionRecords] = None):
        """fuse: run ANEMLL's op chains as fused steps (see mil/fusion.py); None reads
        ANEMLL_FAST_FUSION (on unless set to 0). fusion_records: where the outcome of fusing this
        program's functions is kept between processes (the program cache's, keyed by the program's
        content and fusion.code_key()): a later build replays it instead of probing every chain."""
        self._fuse = fuse
        self._fusion_records = fusion_records
        fn = program.function(function_name)
        self.function_name = fn.name
        self.source = program.source
        bad = unsupported_ops(fn)
        if bad:
            raise UnsupportedOpError(
                f"{program.source}: function {fn.name!r} uses ops not implemented by the reference "
                f"backend: {', '.join(bad)}"
            )
        self._const_cache = const_cache if const_cache is not None else {}
        self._build(fn)

    # ---------------------------------------------------------------- build
    def _shared(self, key_objs: Tuple[Any, ...], make: Callable[[], Stored]) -> Stored:
        """One Stored per stored data, shared between the functions of one program."""
        key = tuple(id(o) for o in key_objs)
        hit = self._const_cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], key_objs)):
            return hit[1]
        st = make()
        self._const_cache[key] = (key_objs, st)
        return st

    def _const_of(self, value: Value) -> Stored:
        """A stored constant; fp16 matrices keep their storage for the native kernels."""
        data = value.data
        # _shared inlined for one key object: a model has ~10^4 constants, most used by one function
        key = (id(data),)
        hit = self._const_cache.get(key)
        if hit is not None and hit[0][0] is data:
            return hit[1]
        native = isinstance(data, np.ndarray) and data.ndim >= 2 and value.dtype == "fp16"
        st = Stored(partial(compute_form, value), ("fp16", data) if native else None)
        self._const_cache[key] = ((data,), st)
        return st

    def _sub_plan(self, block: Block, label: str, consts: Dict[str, Any], types: Dict[str, Any],
                  where: str) -> Tuple["Plan", List[str]]:
        """A block compiled on its own: inputs are its own then the outer runtime values it reads."""
        captured = [n for n in _block_uses(block) if n not in consts]
        missing = [n for n in captured if n not in types]
        if missing:
            raise MilFormatError(f"{where}: block uses undefined variable(s) {', '.join(missing)}")
        fn = Function(label, list(block.inputs) + [Var(n, types[n]) for n in captured], list(block.ops),
                      list(block.outputs))
        if any(op.type in _STATE_OPS for op in _all_ops(fn.ops)):
            raise UnsupportedOpError(f"{where}: state ops inside a control-flow block are not supported")
        if any(isinstance(types[n], StateType) for n in captured):
            raise UnsupportedOpError(f"{where}: a state used inside a control-flow block is not supported")
        sub = Plan.__new__(Plan)
        sub.function_name = label
        sub.source = self.source
        sub._const_cache = self._const_cache
        sub._fuse = self._fuse
        sub._fusion_records = self._fusion_records
        sub._build(fn, outer_consts=consts)
        return sub, captured

    def _control_flow(self, op: Any, fn_name: str, where: str, consts: Dict[str, Any],
                      types: Dict[str, Any]) -> Kernel:
        """cond / while_loop: a kernel that runs the compiled blocks on the values it is given."""
        name = op.outputs[0].name if op.outputs else op.name
        n_out = len(op.outputs)

        def fresh(results: Sequence[Any], given: Sequence[Any]) -> List[Any]:
            # a block may hand an input straight back: copy it, so no later in-place op aliases it
            return [np.array(r, copy=True) if any(r is g for g in given) and isinstance(r, np.ndarray) else r
                    for r in results]

        def truth(v: Any) -> bool:
            a = np.asarray(v)
            if a.size != 1:
                raise MilRuntimeError(f"{where}: a condition must hold one value, got shape {list(a.shape)}")
            return bool(a.reshape(()))

        if op.type == "cond":
            if len(op.blocks) != 2 or op.blocks[0].inputs or op.blocks[1].inputs:
                raise MilFormatError(f"{where}: cond takes two blocks without inputs, got {len(op.blocks)}")
            pred = (op.inputs.get("pred") or [None])[0]
            if pred is None:
                raise MilFormatError(f"{where}: cond without a pred")
            (tp, tcap), (fp, fcap) = (self._sub_plan(b, f"{fn_name}/{name}/{k}", consts, types, where)
                                      for k, b in zip(("true", "false"), op.blocks))
            for p in (tp, fp):
                if len(p.output_names) != n_out:
                    raise MilFormatError(f"{where}: a branch returns {len(p.output_names)} values for "
                                         f"{n_out} outputs")
            caps = tcap + [c for c in fcap if c not in tcap]

            def run_cond(pvalue, *vals):
                env = dict(zip(caps, vals))
                plan, names = (tp, tcap) if truth(pvalue) else (fp, fcap)
                given = [env[c] for c in names]
                res = fresh(plan.run(given, []), given)
                return res[0] if n_out == 1 else tuple(res)

            return Kernel(run_cond, [BindingRef(pred)] + [BindingRef(c) for c in caps], exact=True)

        loop_vars = op.inputs.get("loop_vars") or []
        if len(op.blocks) != 2 or not loop_vars:
            raise MilFormatError(f"{where}: while_loop takes loop_vars, a condition and a body block")
        cond_b, body_b = op.blocks
        nv = len(loop_vars)
        if len(cond_b.inputs) != nv or len(body_b.inputs) != nv or len(cond_b.outputs) != 1 or \
                len(body_b.outputs) != nv or n_out != nv:
            raise MilFormatError(f"{where}: while_loop blocks do not match its {nv} loop variables")
        cp, ccap = self._sub_plan(cond_b, f"{fn_name}/{name}/cond", consts, types, where)
        bp, bcap = self._sub_plan(body_b, f"{fn_name}/{name}/body", consts, types, where)
        caps = ccap + [c for c in bcap if c not in ccap]

        def run_loop(*vals):
            lv = list(vals[:nv])
            env = dict(zip(caps, vals[nv:]))
            cvals, bvals = [env[c] for c in ccap], [env[c] for c in bcap]
            for _ in range(MAX_LOOP_ITERATIONS):
                if not truth(cp.run(lv + cvals, [])[0]):
                    break
                lv = bp.run(lv + bvals, [])
            else:
                raise MilRuntimeError(f"{where}: while_loop did not end after {MAX_LOOP_ITERATIONS} iterations")
            res = fresh(lv, vals)
            return res[0] if nv == 1 else tuple(res)

        return Kernel(run_loop, [BindingRef(b) for b in loop_vars] + [BindingRef(c) for c in caps], exact=True)

    def _lazy_palette(self, ctx: BuildContext, op: Any, where: str) -> Optional[Stored]:
        """constexpr_lut_to_dense (iOS18) with one scalar palette per block of rows: kept as indices
        plus tables for the native kernels, decoded densely only if some other op needs it."""
        if op.type != "constexpr_lut_to_dense" or ctx.has("shape") or len(op.outputs) != 1:
            return None
        b_idx, b_lut = op.inputs.get("indices"), op.inputs.get("lut")
        if not b_idx or not b_lut or not all(isinstance(b, Value) for b in (b_idx[0], b_lut[0])):
            return None
        ind, lut = b_idx[0].data, b_lut[0].data
        nbits = {"uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6, "uint8": 8}.get(b_idx[0].dtype)
        if nbits is None or not isinstance(ind, np.ndarray) or not isinstance(lut, np.ndarray):
            return None
        r = ind.ndim
        if lut.ndim != r + 2 or lut.shape[-1] != 1 or any(d != 1 for d in lut.shape[1:r]) or \
                lut.shape[0] == 0 or ind.shape[0] % lut.shape[0]:
            return None
        out = op.outputs[0]
        if isinstance(out.type, TensorType) and out.type.shape is not None and \
                tuple(out.type.shape) != tuple(ind.shape):
            raise MilFormatError(f"{where}: decoded shape {list(ind.shape)} differs from the declared "
                                 f"{list(out.type.shape)}")
        dt = out.type.dtype if isinstance(out.type, TensorType) else "fp32"

        def dense() -> Any:
            try:
                return round_to(dt, exact=False)(CONSTEXPR[op.type](ctx)[0])
            except MilError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure decoding constants is a bad file
                raise MilFormatError(f"{where}: cannot decode constant: {e}") from e

        def stored() -> Stored:  # once per weight, not per function: reading the indices costs memory
            if ind.size and int(ind.max()) >= lut.shape[r]:
                raise MilFormatError(f"{where}: cannot decode constant: index {int(ind.max())} outside a "
                                     f"{lut.shape[r]}-entry palette")
            table = lut.reshape(lut.shape[0], lut.shape[r]).astype(np.float32)
            return Stored(dense, ("palette", ind, table, nbits))

        return self._shared((ind, lut), stored)

    def _build(self, fn: Function, outer_consts: Optional[Dict[str, Any]] = None) -> None:
        label = f"{self.source}: function {fn.name!r}"
        types: Dict[str, Any] = {v.name: v.type for v in fn.inputs}
        consts: Dict[str, Any] = dict(outer_consts or {})
        slots: Dict[str, int] = {}
        template: List[Any] = []

        def new_slot(init: Any = None) -> int:
            template.append(init)
            return len(template) - 1

        self.input_names: List[str] = []
        self.input_dtypes: List[str] = []
        self.input_slots: List[int] = []
        self.state_names: List[str] = []
        self.state_slots: List[int] = []
        base: Dict[int, Tuple] = {}
        for v in fn.inputs:
            s = slots[v.name] = new_slot()
            if isinstance(v.type, StateType):
                self.state_names.append(v.name)
                self.state_slots.append(s)
                base[s] = ("state", v.name)
            elif isinstance(v.type, TensorType) or (outer_consts is not None and isinstance(v.type, OtherType)):
                # (a block may also take lists and other non-tensor values from its op)
                self.input_names.append(v.name)
                self.input_dtypes.append(v.type.dtype if isinstance(v.type, TensorType) else "")
                self.input_slots.append(s)
                base[s] = ("input", v.name)
            else:
                raise MilFormatError(f"{label}: input {v.name!r} has unsupported type {v.type}")

        const_slots: Dict[Any, int] = {}

        def slot_of(ref: BindingRef, where: str) -> int:
            b = ref.binding
            if isinstance(b, Value):
                s = new_slot(compute_form(b))
                base[s] = ("const",)
                return s
            if b in slots:
                return slots[b]
            if b in consts:
                if b not in const_slots:
                    const_slots[b] = new_slot(unwrap(consts[b]))
                    base[const_slots[b]] = ("const",)
                return const_slots[b]
            raise MilFormatError(f"{where}: uses undefined variable {b!r}")

        raw_steps: List[Tuple[Kernel, Any, List[int], List[int], List[Callable]]] = []
        for op in fn.ops:
            for v in op.outputs:
                types[v.name] = v.type
            if op.type == "const":  # most ops of a model: kept lean
                val = op.attributes.get("val")  # (op.const_value(), inline)
                if val is None or len(op.outputs) != 1:
                    raise MilFormatError(f"{label}, op const ({op.outputs[0].name if op.outputs else op.name}): "
                                         f"const without a value")
                consts[op.outputs[0].name] = self._const_of(val)
                continue
            out_label = op.outputs[0].name if op.outputs else op.name
            where = f"{label}, op {op.type} ({out_label})"
            if op.type in CONTROL_FLOW:
                kernel = self._control_flow(op, fn.name, where, consts, types)
                ctx = None
            else:
                ctx = BuildContext(op, fn.name, self.source, consts, types)
                kernel = None
            lazy = None if ctx is None else self._lazy_palette(ctx, op, where)
            if lazy is not None:
                consts[op.outputs[0].name] = lazy
                continue
            if ctx is not None and op.type in CONSTEXPR:
                try:
                    outs = CONSTEXPR[op.type](ctx)
                except MilError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure decoding constants is a bad file
                    raise MilFormatError(f"{where}: cannot decode constant: {e}") from e
                for v, arr in zip(op.outputs, outs):
                    dt = v.type.dtype if isinstance(v.type, TensorType) else "fp32"
                    arr = round_to(dt, exact=False)(arr)
                    if isinstance(v.type, TensorType) and v.type.shape is not None and \
                            None not in v.type.shape and tuple(arr.shape) != tuple(v.type.shape):
                        raise MilFormatError(f"{where}: decoded shape {list(arr.shape)} differs from "
                                             f"the declared {list(v.type.shape)}")
                    consts[v.name] = arr
                continue
            try:
                if kernel is None:
                    kernel = OPS[op.type](ctx)
            except MilError:
                raise
            except Exception as e:  # noqa: BLE001 - parameters the op cannot take
                raise MilFormatError(f"{where}: bad parameters: {type(e).__name__}: {e}") from e
            fins = [round_to(v.type.dtype if isinstance(v.type, TensorType) else "", kernel.exact)
                    for v in op.outputs]
            # Constant folding: an op of constants (not a state op) is evaluated once, now.
            if op.type not in _STATE_OPS and kernel.pure and all(
                    isinstance(r.binding, Value) or r.binding in consts for r in kernel.args):
                vals = [compute_form(r.binding) if isinstance(r.binding, Value) else unwrap(consts[r.binding])
                        for r in kernel.args]
                try:
                    res = kernel.fn(*vals)
                except Exception as e:  # noqa: BLE001 - any failure here is a bad program
                    raise MilFormatError(f"{where}: fails on its constant inputs: {e}") from e
                res = (res,) if len(op.outputs) == 1 else tuple(res)
                for v, f, r in zip(op.outputs, fins, res):
                    consts[v.name] = f(r)
                continue
            ins = [slot_of(r, where) for r in kernel.args]
            outs = []
            for v in op.outputs:
                if v.name in slots or v.name in consts:
                    raise MilFormatError(f"{where}: variable {v.name!r} is defined twice")
                s = slots[v.name] = new_slot()
                outs.append(s)
            raw_steps.append((kernel, op, ins, outs, fins))

        out_slots = []
        self.output_names = list(fn.outputs)
        self.output_dtypes = []
        for o in fn.outputs:
            t = types.get(o)
            if isinstance(t, TensorType):
                self.output_dtypes.append(t.dtype)
            elif outer_consts is not None and isinstance(t, OtherType):
                self.output_dtypes.append("")  # a block may hand lists back to its op
            else:
                raise MilFormatError(f"{label}: output {o!r} is not a tensor variable")
            if o in slots:
                out_slots.append(slots[o])
            elif o in consts:
                out_slots.append(slot_of(BindingRef(o), label))
            else:
                raise MilFormatError(f"{label}: output {o!r} is never defined")
        self.output_slots = out_slots

        raw_steps, self.fused_attention = fuse_attention(raw_steps, out_slots, consts, self._fuse)
        self.fused: Dict[str, int] = {}
        if fusion.enabled(self._fuse):
            fixed = {s: template[s] for s, b in base.items() if b == ("const",)}
            records = self._fusion_records
            known = records.get(fn.name) if records is not None else None
            raw_steps, self.fused, record = fusion.fuse(raw_steps, out_slots, consts, types, fixed, known)
            if records is not None and record is not known:
                records.put(fn.name, record)
        inplace = self._inplace_steps(raw_steps, base, out_slots)
        steps: List[_Step] = []
        dead = dead_after([(ins, outs) for _k, _op, ins, outs, _f in raw_steps], out_slots)
        for i, (kernel, op, ins, outs, fins) in enumerate(raw_steps):
            ip = i in inplace
            run = with_release(_make_step(kernel.fn, tuple(ins), tuple(outs), tuple(fins), ip), dead[i])
            steps.append(_Step(run, op.type, op.outputs[0].name if op.outputs else op.name))
        self.steps = steps
        self._runs = [s.run for s in steps]
        self.template = template
        self.inplace_count = len(inplace)

    @staticmethod
    def _inplace_steps(raw_steps: Sequence, base: Dict[int, Tuple], out_slots: List[int]) -> set:
        """Indices of steps whose kernel may overwrite its inplace operand (see module docstring).

        Walks the steps in order, tracking for every slot the buffer it may alias ("base"): a view
        op's output aliases its input, an in-place update's output is its input buffer, read_state
        returns the state's own buffer. An update may write in place when no other alias of that
        buffer is read later, and, for a state's buffer, when the state is next written (not read)."""
        n = len(raw_steps)
        last_use: Dict[int, int] = {}
        for i, (_k, _op, ins, _outs, _f) in enumerate(raw_steps):
            for s in ins:
                last_use[s] = i
        for s in out_slots:
            last_use[s] = n  # read after the last step
        by_base: Dict[Tuple, List[int]] = {}
        for s, b in base.items():
            if b[0] != "state":  # a state input slot holds the StateBuffer, not its array
                by_base.setdefault(b, []).append(s)
        chosen = set()
        state_steps = [(j, op) for j, (_k, op, _i, _o, _f) in enumerate(raw_steps) if op.type in _STATE_OPS]
        for i, (kernel, op, ins, outs, _f) in enumerate(raw_steps):
            inplace_ok = False
            if kernel.inplace_arg is not None and len(outs) == 1:
                x = ins[kernel.inplace_arg]
                b = base.get(x)
                inplace_ok = (
                    b is not None and b[0] in ("own", "state")
                    and not any(last_use.get(s, -1) > i for s in by_base.get(b, ()))
                    and not any(s == x for j, s in enumerate(ins) if j != kernel.inplace_arg)
                    and (b[0] != "state" or Plan._written_next(state_steps, i, b[1]))
                )
            if inplace_ok:
                chosen.add(i)
                out_bases = [base[ins[kernel.inplace_arg]]]
            elif op.type in _VIEW_OPS and ins:
                out_bases = [base.get(ins[0], ("own", outs[0] if outs else -1))] * len(outs)
            else:
                out_bases = [("own", o) for o in outs]
            for o, b in zip(outs, out_bases):
                base[o] = b
                by_base.setdefault(b, []).append(o)
        return chosen

    @staticmethod
    def _written_next(state_steps: Sequence[Tuple[int, Any]], i: int, state: str) -> bool:
        """True if the next access to `state` after step i writes it (rather than reads it).
        `state_steps`: (index, op) of the steps that are state ops, in order."""
        for j, op in state_steps:
            if j <= i:
                continue
            state_param = "state" if op.type == "coreml_update_state" else "input"
            binds = op.inputs.get(state_param) or []
            if not binds or binds[0] != state:
                continue
            return op.type != "read_state"
        return False

    # ---------------------------------------------------------------- run
    def run(self, inputs: Sequence[Any], states: Sequence[Any]) -> List[np.ndarray]:
        """inputs in compute form (order of input_names), states as StateBuffers (order of state_names).

        Returns the outputs in compute form (order of output_names)."""
        env = self.template.copy()
        for s, a in zip(self.input_slots, inputs):
            env[s] = a
        for s, st in zip(self.state_slots, states):
            env[s] = st
        i = 0
        try:
            for i, run in enumerate(self._runs):
                run(env)
        except MilError:
            raise
        except Exception as e:  # noqa: BLE001 - reported with the op that failed
            step = self.steps[i]
            raise MilRuntimeError(
                f"{self.source}: function {self.function_name!r}, op {step.op_type} ({step.out_name}) "
                f"failed: {type(e).__name__}: {e}"
            ) from e
        return [env[s] for s in self.output_slots]
