"""Plan rewrites that run op chains of ANEMLL's graphs as one step each.

A decode step of an ANEMLL model is ~60 plan steps per layer, most of them on a few hundred values:
their cost is the per-step dispatch and numpy call overhead, not arithmetic. These rewrites cut it:

- RMSNorm as ANEMLL writes it, `slice(layer_norm(concat([x, x * -1], -1)), first half)`, becomes
  one native kernel (`mirror_norm`);
- the rotary embedding `x * cos + concat([-x2, x1]) * sin` (x1, x2 the halves of x's last axis)
  becomes one native kernel (`rotary`);
- the SiLU-gated product `silu(a) * b` becomes one step computing in one buffer;
- a float add of two runtime operands of one shape (the residual adds) becomes one native pass (sum
  and rounding), reading a transposed-view operand in place;
- a run of view ops (reshape / transpose / squeeze / expand_dims) becomes one step, a single
  `reshape` when the run only renames axes (checked on an index array at build time), and a view
  step then runs inside the step producing its operand;
- an integer concat of constants and one runtime piece (the `[layer, 0, pos, 0]` begin / end of a
  KV-cache update) copies a template, inside the step that reads it.

Fidelity: a fused step computes what the chain computes, bit for bit (the kernels round to fp16 where
the chain's ops have fp16 outputs, in the chain's order of operations). A chain is fused only when its
structure matches exactly (op types, wiring, every intermediate read by the chain alone, uniform
float dtype, static shapes, the constants the pattern needs) and, as a last guard, when the fused step
gives the chain's exact bits on a random probe of the declared shapes. At run time a fused step whose
operands do not fit its kernel (another shape, a non-contiguous view) runs the original ops instead.

A later build of the same steps need not probe again: `fuse` returns a record of which steps each pass
rewrote and how their probes came out, and given that record back it matches only those steps (their
structure checked as before) and answers their probes from it. The program cache keeps records beside
its entries, under `code_key()`: the probes' outcome is a function of the program, this package's
interpreter code, the native kernels' binary and the CPU paths taken, all of which the keys cover.

ANEMLL_FAST_FUSION=0 (or Plan(..., fuse=False)) turns these rewrites off.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from anemll_fast.mil.ops.registry import Kernel, unwrap
from anemll_fast.mil.program import TensorType, Value

try:  # without the native extension nothing is fused (the op-by-op path is complete)
    from anemll_fast import _kernels as native
except ImportError:  # pragma: no cover - a build without the extension
    native = None

RawStep = Tuple[Kernel, Any, List[int], List[int], List[Callable]]
VIEW_OPS = frozenset({"reshape", "transpose", "squeeze", "expand_dims"})
_PROBE_SEED = 20261204


def enabled(option: Optional[bool] = None) -> bool:
    """Whether plans fuse: the explicit option if given, else ANEMLL_FAST_FUSION (default on)."""
    if option is not None:
        return bool(option) and native is not None
    return os.environ.get("ANEMLL_FAST_FUSION", "1").strip().lower() not in ("0", "false", "no", "off") \
        and native is not None


_code_key: Optional[str] = None


def code_key() -> str:
    """What, besides the program, decides which chains fuse (and how their probes come out): the source
    of the interpreter (every module of anemll_fast.mil: the ops the chains run, the plan building the
    steps, these matchers), the native kernels' binary and the instruction-set paths they and numpy
    take on this CPU, and the versions of numpy and Python. A fusion record (see `fuse`) made under
    another code key is not replayed. Computed once per process (~2 ms)."""
    global _code_key
    if _code_key is None:
        import platform
        import sys
        from pathlib import Path

        try:
            from numpy._core import _multiarray_umath as umath
        except ImportError:  # numpy 1.x
            from numpy.core import _multiarray_umath as umath
        features = sorted(k for k, on in getattr(umath, "__cpu_features__", {}).items() if on)
        build = (getattr(umath, "__cpu_baseline__", None), getattr(umath, "__cpu_dispatch__", None))
        machine = repr((None if native is None else (native.kernel_isa(), native.chain_isa()),
                        np.__version__, features, build, sys.version, platform.machine(),
                        [os.environ.get(v) for v in ("NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES")]))
        _code_key = _digest(Path(__file__).resolve().parent, None if native is None else Path(native.__file__),
                            machine)
    return _code_key


def _digest(sources: Any, binary: Any, machine: str) -> str:
    """sha256 of every .py under `sources` (by relative name), of the `binary` file, and of `machine`."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(sources.rglob("*.py")):
        h.update(f.relative_to(sources).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    if binary is not None:
        h.update(binary.read_bytes())
    h.update(machine.encode())
    return h.hexdigest()


@dataclass
class FusedOp:
    """Stands for the ops a fused step replaced (the plan names steps and finds view ops by `type`)."""

    type: str
    outputs: List[Any]
    replaced: List[Any]
    inputs: Dict[str, Any] = field(default_factory=dict)
    name: str = ""
    blocks: List[Any] = field(default_factory=list)


def _identity(r: Any) -> Any:
    return r


def _const(op: Any, name: str, consts: Dict[str, Any]) -> Any:
    """A constant input of an op (compute form), or None (absent or not a constant)."""
    binds = op.inputs.get(name)
    if not binds or len(binds) != 1:
        return None
    b = binds[0]
    if isinstance(b, Value):
        return b.data
    v = consts.get(b)
    return None if v is None else unwrap(v)


def _int_list(v: Any) -> Optional[List[int]]:
    return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]


def _out_type(op: Any, i: int = 0) -> Optional[TensorType]:
    t = op.outputs[i].type if len(op.outputs) > i else None
    return t if isinstance(t, TensorType) else None


def _static_shape(t: Any) -> Optional[Tuple[int, ...]]:
    if not isinstance(t, TensorType) or t.shape is None or any(d is None for d in t.shape):
        return None
    return tuple(int(d) for d in t.shape)


class _Graph:
    """Who produces and who reads each slot of a step list; `fixed` holds the constant slots' values."""

    def __init__(self, raw_steps: Sequence[RawStep], out_slots: Sequence[int], fixed: Dict[int, Any]):
        self.steps = raw_steps
        self.fixed = fixed
        self.producer: Dict[int, int] = {}
        self.readers: Dict[int, int] = {}
        for i, (_k, _op, ins, outs, _f) in enumerate(raw_steps):
            for s in outs:
                self.producer[s] = i
            for s in ins:
                self.readers[s] = self.readers.get(s, 0) + 1
        for s in out_slots:
            self.readers[s] = self.readers.get(s, 0) + 1

    def sole(self, slot: int) -> bool:
        return self.readers.get(slot, 0) == 1

    def made_by(self, slot: int, op_type: str) -> Optional[int]:
        """The step producing `slot` when it is a single-output `op_type` read only once, else None."""
        i = self.producer.get(slot)
        if i is None or not self.sole(slot):
            return None
        _k, op, _ins, outs, _f = self.steps[i]
        return i if op.type == op_type and len(outs) == 1 else None


def _chain_runner(g: _Graph, steps: Sequence[RawStep], in_slots: Sequence[int], out_slot: int) -> Callable:
    """fn(*inputs) running `steps` op by op, as the plan would: the fused step's fallback and probe."""
    plan = [(k.fn, ins, outs, fins) for k, _op, ins, outs, fins in steps]
    pos = {s: j for j, s in enumerate(in_slots)}
    made = {o for st in steps for o in st[3]}
    fixed = {s: g.fixed[s] for st in steps for s in st[2] if s not in pos and s not in made and s in g.fixed}

    def run(*vals):
        env = dict(fixed)
        env.update((s, vals[j]) for s, j in pos.items())
        for fn, ins, outs, fins in plan:
            r = fn(*[env[s] for s in ins])
            if len(outs) == 1:
                env[outs[0]] = fins[0](r)
            else:
                for o, f, v in zip(outs, fins, r):
                    env[o] = f(v)
        return env[out_slot]

    return run


def _probe_equal(fused: Callable, chain: Callable, shapes: Sequence[Tuple[int, ...]], fp16: bool) -> bool:
    """The fused function gives the chain's exact bits on random inputs of the given shapes."""
    rng = np.random.default_rng(_PROBE_SEED)
    vals = []
    for sh in shapes:
        v = (rng.standard_normal(sh) * 2).astype(np.float32)
        vals.append(v.astype(np.float16).astype(np.float32) if fp16 else v)
    try:
        want = chain(*vals)
        got = fused(*vals)
    except Exception:  # noqa: BLE001 - a chain that cannot run on the probe is simply not fused
        return False
    return isinstance(got, np.ndarray) and got.shape == np.shape(want) and \
        np.array_equal(got, np.asarray(want), equal_nan=True)


def _with_fallback(fast: Callable, chain: Callable) -> Callable:
    def run(*vals):
        try:
            return fast(*vals)
        except ValueError:  # operands the kernel does not take: the chain, op by op
            return chain(*vals)
    return run


def _float_dtype(ops: Sequence[Any]) -> Optional[str]:
    """"fp16" or "fp32" when every op's first output has that one dtype, else None."""
    dts = {(_out_type(op).dtype if _out_type(op) else None) for op in ops}
    if len(dts) != 1:
        return None
    dt = dts.pop()
    return dt if dt in ("fp16", "fp32") else None


# ---------------------------------------------------------------- RMSNorm
def _match_mirror_norm(g: _Graph, i_slice: int, consts: Dict[str, Any], types: Dict[str, Any], probe: "_Probe"
                       ) -> Optional[Tuple[List[int], RawStep]]:
    steps = g.steps
    _k, op_s, ins_s, outs_s, _f = steps[i_slice]
    if op_s.type != "slice_by_index" or len(ins_s) != 1:
        return None
    i_ln = g.made_by(ins_s[0], "layer_norm")
    if i_ln is None:
        return None
    op_ln, ins_ln = steps[i_ln][1], steps[i_ln][2]
    i_cat = g.made_by(ins_ln[0], "concat") if len(ins_ln) == 1 else None
    if i_cat is None:
        return None
    op_cat, ins_cat = steps[i_cat][1], steps[i_cat][2]
    if len(ins_cat) != 2:
        return None
    x_slot = ins_cat[0]
    i_neg = g.made_by(ins_cat[1], "mul")
    if i_neg is None:
        return None
    op_neg, ins_neg = steps[i_neg][1], steps[i_neg][2]
    x_name = op_cat.inputs["values"][0]
    shape = _static_shape(types.get(x_name)) if isinstance(x_name, str) else None
    dt = _float_dtype([op_neg, op_cat, op_ln, op_s])
    if shape is None or not shape or dt is None or _static_shape(_out_type(op_s)) != shape:
        return None
    rank, h = len(shape), shape[-1]
    # x * -1 (either operand order), concatenated after x on the last axis, normalized over that axis
    neg_ok = False
    for xn, cn in (("x", "y"), ("y", "x")):
        c = _const(op_neg, cn, consts)
        if op_neg.inputs.get(xn) == [x_name] and c is not None and np.size(c) == 1 and \
                float(np.asarray(c).reshape(-1)[0]) == -1.0:
            neg_ok = True
    axis = _const(op_cat, "axis", consts)
    inter = _const(op_cat, "interleave", consts)
    axes = _int_list(_const(op_ln, "axes", consts))
    eps = _const(op_ln, "epsilon", consts)
    gamma = _const(op_ln, "gamma", consts) if op_ln.inputs.get("gamma") else None
    beta = _const(op_ln, "beta", consts) if op_ln.inputs.get("beta") else None
    if not neg_ok or axis is None or int(np.asarray(axis).reshape(-1)[0]) % rank != rank - 1 or \
            (inter is not None and bool(np.asarray(inter).reshape(-1)[0])) or \
            axes is None or len(axes) != 1 or axes[0] % rank != rank - 1 or \
            (op_ln.inputs.get("epsilon") and eps is None) or \
            (op_ln.inputs.get("gamma") and gamma is None) or (op_ln.inputs.get("beta") and beta is None):
        return None
    eps32 = np.float32(1e-5 if eps is None else np.asarray(eps).reshape(-1)[0])
    g32 = None if gamma is None else np.ascontiguousarray(gamma, dtype=np.float32).reshape(-1)
    b32 = None if beta is None else np.ascontiguousarray(beta, dtype=np.float32).reshape(-1)
    if any(v is not None and v.size != 2 * h for v in (g32, b32)):
        return None
    round16 = dt == "fp16"
    idx = [i_neg, i_cat, i_ln, i_slice]
    chain = _chain_runner(g, [steps[j] for j in idx], [x_slot], outs_s[0])
    eps_f = float(eps32)

    def fast(x):
        return native.mirror_norm(x, g32, b32, eps_f, round16)

    if not probe(fast, chain, [shape], round16):
        return None
    fused_op = FusedOp("rms_norm", list(op_s.outputs), [steps[j][1] for j in idx])
    return idx, (Kernel(_with_fallback(fast, chain), []), fused_op, [x_slot], list(outs_s), [_identity])


# ---------------------------------------------------------------- rotary embedding
def _match_rotary(g: _Graph, i_add: int, consts: Dict[str, Any], types: Dict[str, Any], probe: "_Probe"
                  ) -> Optional[Tuple[List[int], RawStep]]:
    steps = g.steps
    _k, op_add, ins_add, outs_add, _f = steps[i_add]
    if op_add.type != "add" or len(ins_add) != 2:
        return None
    muls = [g.made_by(s, "mul") for s in ins_add]
    if None in muls:
        return None
    for i_a, i_b in (muls, muls[::-1]):
        found = _rotary_parts(g, i_a, i_b)
        if found is None:
            continue
        x_slot, cos_slot, sin_slot, i_cat, i_neg, i_s1, i_s2 = found
        idx = sorted([i_s1, i_s2, i_neg, i_cat, i_a, i_b, i_add])
        ops = [steps[j][1] for j in idx]
        dt = _float_dtype(ops)
        x_name = _name_of(steps[i_a][1], x_slot, steps[i_a][2])
        shape = _static_shape(types.get(x_name)) if x_name else None
        names = [_name_of(steps[i_a][1], cos_slot, steps[i_a][2]), _name_of(steps[i_b][1], sin_slot, steps[i_b][2])]
        tshapes = [_static_shape(types.get(n)) if n else None for n in names]
        if dt is None or shape is None or len(shape) < 2 or None in tshapes or tshapes[0] != tshapes[1] or \
                _static_shape(_out_type(op_add)) != shape or shape[-1] % 2:
            continue
        neg = steps[i_neg][1]
        if not any(_is_minus_one(_const(neg, n, consts)) for n in ("x", "y")):
            continue
        cat = steps[i_cat][1]
        axis = _const(cat, "axis", consts)
        inter = _const(cat, "interleave", consts)
        if axis is None or int(np.asarray(axis).reshape(-1)[0]) % len(shape) != len(shape) - 1 or \
                (inter is not None and bool(np.asarray(inter).reshape(-1)[0])):
            continue
        round16 = dt == "fp16"
        chain = _chain_runner(g, [steps[j] for j in idx], [x_slot, cos_slot, sin_slot], outs_add[0])

        def fast(x, c, s, round16=round16):
            # ANEMLL's q / k reach the rotary as a transposed view of a projection's output, which the
            # kernel reads in place; another strided x is copied to rows first (exact), not left to the
            # chain's six numpy passes
            if type(x) is np.ndarray and not x.flags.c_contiguous:
                try:
                    return native.rotary(x, c, s, round16)
                except ValueError:
                    x = np.ascontiguousarray(x)
            return native.rotary(x, c, s, round16)

        if not probe(fast, chain, [shape, tshapes[0], tshapes[1]], round16):
            continue
        fused_op = FusedOp("rotary", list(op_add.outputs), ops)
        return idx, (Kernel(_with_fallback(fast, chain), []), fused_op, [x_slot, cos_slot, sin_slot],
                     list(outs_add), [_identity])
    return None


def _is_minus_one(c: Any) -> bool:
    return c is not None and np.size(c) == 1 and float(np.asarray(c).reshape(-1)[0]) == -1.0


def _name_of(op: Any, slot: int, ins: List[int]) -> Optional[str]:
    """The variable name an op binds to the operand in `slot` (None for inline constants)."""
    for param in ("x", "y"):
        binds = op.inputs.get(param) or []
        if binds and isinstance(binds[0], str):
            j = ("x", "y").index(param)
            if j < len(ins) and ins[j] == slot:
                return binds[0]
    return None


def _rotary_parts(g: _Graph, i_a: int, i_b: int) -> Optional[Tuple[int, ...]]:
    """(x, cos, sin, concat, neg, slice1, slice2) when step i_a is x * cos and i_b is rot(x) * sin."""
    steps = g.steps
    ins_a, ins_b = steps[i_a][2], steps[i_b][2]
    if len(ins_a) != 2 or len(ins_b) != 2:
        return None
    for rot_pos in (0, 1):
        i_cat = g.made_by(ins_b[rot_pos], "concat")
        if i_cat is None or len(steps[i_cat][2]) != 2:
            continue
        sin_slot = ins_b[1 - rot_pos]
        neg_slot, s1_slot = steps[i_cat][2]
        i_neg = g.made_by(neg_slot, "mul")
        i_s1 = g.made_by(s1_slot, "slice_by_index")
        if i_neg is None or i_s1 is None or len(steps[i_s1][2]) != 1:
            continue
        x_slot = steps[i_s1][2][0]
        neg_ins = steps[i_neg][2]
        i_s2 = None
        for s in neg_ins:
            j = g.made_by(s, "slice_by_index")
            if j is not None and steps[j][2] == [x_slot]:
                i_s2 = j
        if i_s2 is None or i_s2 == i_s1 or x_slot not in ins_a:
            continue
        cos_slot = ins_a[1 - ins_a.index(x_slot)]
        if cos_slot == x_slot or sin_slot == x_slot:
            continue
        return x_slot, cos_slot, sin_slot, i_cat, i_neg, i_s1, i_s2
    return None


# ---------------------------------------------------------------- SiLU-gated product
def _match_silu_mul(g: _Graph, i_mul: int, consts: Dict[str, Any], types: Dict[str, Any], probe: "_Probe"
                    ) -> Optional[Tuple[List[int], RawStep]]:
    """mul(silu(a), b) of one shape: the same numpy operations as the two ops, in one step and one
    buffer (no temporaries but the result), rounded where the ops round."""
    steps = g.steps
    _k, op_m, ins_m, outs_m, _f = steps[i_mul]
    if op_m.type != "mul" or len(ins_m) != 2:
        return None
    for pos in (0, 1):
        i_s = g.made_by(ins_m[pos], "silu")
        if i_s is None or len(steps[i_s][2]) != 1:
            continue
        a_slot, b_slot = steps[i_s][2][0], ins_m[1 - pos]
        op_s = steps[i_s][1]
        dt = _float_dtype([op_s, op_m])
        a_name = (op_s.inputs.get("x") or [None])[0]
        b_name = (op_m.inputs.get("y" if pos == 0 else "x") or [None])[0]
        shape = _static_shape(types.get(a_name)) if isinstance(a_name, str) else None
        if dt is None or shape is None or not isinstance(b_name, str) or \
                _static_shape(types.get(b_name)) != shape or _static_shape(_out_type(op_m)) != shape:
            continue
        round16 = dt == "fp16"
        chain = _chain_runner(g, [steps[i_s], steps[i_mul]], [a_slot, b_slot], outs_m[0])
        half = np.float32(0.5)

        def fast(a, b, round16=round16):
            if type(a) is not np.ndarray or a.dtype != np.float32 or type(b) is not np.ndarray or \
                    a.shape != b.shape or b.dtype != np.float32:
                raise ValueError("operands the fused product does not take")
            # the silu op is x * 0.5 * (1 + tanh(0.5 x)): numpy's tanh, then the rest in one native
            # pass in the ops' order (a product's operand order does not change its bits)
            t = np.multiply(half, a)
            np.tanh(t, out=t)
            return native.silu_gate(a, t, b, round16)

        if not probe(fast, chain, [shape, shape], round16):
            continue
        fused_op = FusedOp("silu_mul", list(op_m.outputs), [op_s, op_m])
        return [i_s, i_mul], (Kernel(_with_fallback(fast, chain), []), fused_op, [a_slot, b_slot], list(outs_m),
                              [_identity])
    return None


# ---------------------------------------------------------------- float add
def _match_add(g: _Graph, i_add: int, consts: Dict[str, Any], types: Dict[str, Any], probe: "_Probe"
               ) -> Optional[Tuple[List[int], RawStep]]:
    """add(x, y) of two runtime operands of one static shape (a residual add): the sum and its fp16
    rounding in one native pass, which also reads a transposed view (a projection's output) in place."""
    _k, op, ins, outs, _f = g.steps[i_add]
    if op.type != "add" or len(ins) != 2 or len(outs) != 1 or any(s in g.fixed for s in ins):
        return None
    dt = _float_dtype([op])
    names = [(op.inputs.get(p) or [None])[0] for p in ("x", "y")]
    shapes = [_static_shape(types.get(n)) if isinstance(n, str) else None for n in names]
    out_shape = _static_shape(_out_type(op))
    if dt is None or out_shape is None or shapes != [out_shape, out_shape]:
        return None
    round16 = dt == "fp16"
    chain = _chain_runner(g, [g.steps[i_add]], list(ins), outs[0])

    def fast(x, y, round16=round16):
        return native.add(x, y, round16)

    if not probe(fast, chain, [out_shape, out_shape], round16):
        return None
    return [i_add], (Kernel(_with_fallback(fast, chain), []), FusedOp("add", list(op.outputs), [op]), list(ins),
                     list(outs), [_identity])


# ---------------------------------------------------------------- view runs
def _match_views(g: _Graph, i_last: int, types: Dict[str, Any], probe: "_Probe"
                 ) -> Optional[Tuple[List[int], RawStep]]:
    """The longest run of view ops ending at i_last, each feeding only the next; one step for it."""
    steps = g.steps
    if steps[i_last][1].type not in VIEW_OPS or len(steps[i_last][3]) != 1:
        return None
    idx = [i_last]
    while True:
        ins = steps[idx[0]][2]
        j = None
        for t in VIEW_OPS:
            j = g.made_by(ins[0], t) if ins else None
            if j is not None:
                break
        if j is None:
            break
        idx.insert(0, j)
    if len(idx) < 2:
        return None
    first_op, last_op = steps[idx[0]][1], steps[i_last][1]
    x_slot = steps[idx[0]][2][0]
    x_name = (first_op.inputs.get("x") or [None])[0]
    in_shape = _static_shape(types.get(x_name)) if isinstance(x_name, str) else None
    out_shape = _static_shape(_out_type(last_op))
    sub = [steps[j] for j in idx]
    if any(len(st[2]) != 1 for st in sub):  # shapes / axes given at run time: leave the run alone
        return None
    chain = _chain_runner(g, sub, [x_slot], steps[i_last][3][0])
    last_fin = steps[i_last][4][0]
    pure = False
    # (an index array through the run proves it a reshape; float32 finishers keep indices exact to 2^24)
    if in_shape is not None and out_shape is not None and \
            math.prod(in_shape) == math.prod(out_shape) <= 1 << 24:
        n = math.prod(in_shape)

        def renames_axes() -> bool:
            try:
                got = chain(np.arange(n, dtype=np.int64).reshape(in_shape))
                return np.shape(got) == out_shape and np.array_equal(np.asarray(got).reshape(-1), np.arange(n))
            except Exception:  # noqa: BLE001 - not a reshape after all
                return False

        pure = probe.ask(renames_axes, "reshape", [in_shape, out_shape], False)
    if pure:
        def run(x, in_shape=in_shape, out_shape=out_shape):
            if x.shape == in_shape:
                return last_fin(x.reshape(out_shape))
            return chain(x)
        kind = "reshape_run"
    else:
        run = chain
        kind = "view_run"
    fused_op = FusedOp(kind, list(last_op.outputs), [st[1] for st in sub])
    return idx, (Kernel(run, [], exact=True), fused_op, [x_slot], list(steps[i_last][3]), [_identity])


# ---------------------------------------------------------------- view steps folded into their producer
_STATE_OPS = frozenset({"read_state", "write_state", "coreml_update_state"})
_FOLDABLE_VIEWS = VIEW_OPS | {"reshape_run", "view_run"}


def _fold_views(raw_steps: List[RawStep], out_slots: Sequence[int]) -> Tuple[List[RawStep], int]:
    """A single-operand view step whose operand is read by it alone runs inside the step producing that
    operand (producer, its rounding, then the view): one dispatch instead of two. The merged step keeps
    the producer's op type, so the plan's aliasing analysis sees it as it saw the producer."""
    g = _Graph(raw_steps, out_slots, {})
    merged: Dict[int, RawStep] = {}   # producer index -> merged step
    dropped = set()
    for i, (k, op, ins, outs, fins) in enumerate(raw_steps):
        if op.type not in _FOLDABLE_VIEWS or len(ins) != 1 or len(outs) != 1 or not g.sole(ins[0]):
            continue
        p = g.producer.get(ins[0])
        if p is None or p in dropped:
            continue
        kp, opp, insp, outsp, finsp = merged.get(p, raw_steps[p])
        if len(outsp) != 1 or kp.inplace_arg is not None or opp.type in _STATE_OPS or outsp[0] != ins[0]:
            continue

        def run(*vals, pf=kp.fn, pfin=finsp[0], vf=k.fn, vfin=fins[0]):
            return vfin(vf(pfin(pf(*vals))))

        kind = opp.type
        fop = FusedOp(kind, list(op.outputs), list(getattr(opp, "replaced", [opp])) + [op])
        merged[p] = (Kernel(run, kp.args, exact=kp.exact and k.exact, pure=kp.pure), fop, insp, list(outs),
                     [_identity])
        dropped.add(i)
    if not merged:
        return raw_steps, 0
    out = [merged.get(i, st) for i, st in enumerate(raw_steps) if i not in dropped]
    return out, len(dropped)


# ---------------------------------------------------------------- small integer concats
def _fast_int_concats(raw_steps: List[RawStep], fixed: Dict[int, Any]) -> Tuple[List[RawStep], int]:
    """concat of 1-D integer pieces, all constant but one (ANEMLL builds the KV-cache update's begin and
    end as [layer, 0, position, 0] this way): the constant pieces are joined once, at build time, and
    each run copies that template and writes the runtime piece into its place."""
    out, n = [], 0
    for st in raw_steps:
        k, op, ins, outs, fins = st
        t = _out_type(op)
        runtime = [j for j, s in enumerate(ins) if s not in fixed]
        if op.type != "concat" or len(outs) != 1 or t is None or not t.dtype.startswith(("int", "uint")) or \
                len(runtime) != 1 or _static_shape(t) is None or len(_static_shape(t)) != 1:
            out.append(st)
            continue
        parts = [np.asarray(fixed[s]) if j not in runtime else None for j, s in enumerate(ins)]
        if any(p is not None and p.ndim != 1 for p in parts):
            out.append(st)
            continue
        j0 = runtime[0]
        size = _static_shape(t)[0]
        width = size - sum(p.size for p in parts if p is not None)
        start = sum(p.size for p in parts[:j0])
        try:
            whole = np.asarray(fins[0](k.fn(*[p if p is not None else np.zeros(width, np.int64) for p in parts])))
        except Exception:  # noqa: BLE001 - not the simple concat it looked like
            out.append(st)
            continue
        if whole.shape != (size,) or width < 0:
            out.append(st)
            continue
        slow, fin = k.fn, fins[0]
        a, b = start, start + width

        def run(v, whole=whole, a=a, b=b, slow=slow, fin=fin, parts=parts, j0=j0):
            if np.ndim(v) != 1 or np.shape(v)[0] != b - a:
                return fin(slow(*[p if p is not None else v for p in parts]))
            r = whole.copy()
            r[a:b] = v  # numpy casts as the op's finisher would (the plan holds int values here)
            return r

        out.append((Kernel(run, [k.args[j0]], exact=True), FusedOp("int_concat", list(op.outputs), [op]),
                    [ins[j0]], outs, [_identity]))
        n += 1
    return out, n


def _fold_int_concats(raw_steps: List[RawStep], out_slots: Sequence[int]) -> Tuple[List[RawStep], int]:
    """A templated concat read by one step alone (the begin / end of a KV-cache update) is computed
    inside that step, from the concat's runtime piece: two dispatches fewer per update."""
    g = _Graph(raw_steps, out_slots, {})
    dropped = set()
    out = []
    for i, (k, op, ins, outs, fins) in enumerate(raw_steps):
        pre = {}
        for j, slot in enumerate(ins):
            p = g.producer.get(slot)
            if p is None or j == k.inplace_arg or not g.sole(slot) or raw_steps[p][1].type != "int_concat" or \
                    ins.count(slot) != 1:
                continue
            pre[j] = raw_steps[p]
        if not pre:
            out.append((k, op, ins, outs, fins))
            continue
        makers = tuple((j, st[0].fn) for j, st in sorted(pre.items()))

        def run(*vals, fn=k.fn, makers=makers, **kw):
            vals = list(vals)
            for j, make in makers:
                vals[j] = make(vals[j])
            return fn(*vals, **kw)

        new_ins = [pre[j][2][0] if j in pre else s for j, s in enumerate(ins)]
        dropped.update(g.producer[ins[j]] for j in pre)
        out.append((Kernel(run, [], exact=k.exact, inplace_arg=k.inplace_arg, pure=k.pure), op, new_ins, outs,
                    fins))
    if not dropped:
        return raw_steps, 0
    # raw_steps and out are index-aligned: drop the folded concats
    return [st for i, st in enumerate(out) if i not in dropped], len(dropped)


# ---------------------------------------------------------------- driver
class _Stale(Exception):
    """A fusion record that does not describe these steps (replayed, it diverged)."""


class _Probe:
    """The bit-exactness probes of one match attempt: run and noted, or, when replaying a record, answered
    by the outcomes noted when the probes ran (each with the shapes it was run on, which must agree)."""

    __slots__ = ("noted", "replay")

    def __init__(self, replay: Optional[List[Any]] = None):
        self.noted: List[List[Any]] = []
        self.replay = replay

    def __call__(self, fused: Callable, chain: Callable, shapes: Sequence[Tuple[int, ...]], fp16: bool) -> bool:
        """Whether `fused` gives the chain's bits (_probe_equal)."""
        return self.ask(lambda: _probe_equal(fused, chain, shapes, fp16), "equal", shapes, fp16)

    def ask(self, test: Callable[[], bool], kind: str, shapes: Sequence[Tuple[int, ...]], fp16: bool) -> bool:
        """test(), or its recorded outcome: (kind, shapes, fp16) say what was tested, and must agree."""
        asked = [kind, bool(fp16), [[int(d) for d in sh] for sh in shapes]]
        if self.replay is None:
            ok = bool(test())
        else:
            j = len(self.noted)
            if j >= len(self.replay) or self.replay[j][1:] != asked:
                raise _Stale("a probe the record does not hold")
            ok = self.replay[j][0] is True
        self.noted.append([ok] + asked)
        return ok

    def spent(self) -> bool:
        return self.replay is None or len(self.noted) == len(self.replay)


_MATCHERS = (_match_mirror_norm, _match_rotary, _match_silu_mul, _match_add)


def fuse(raw_steps: List[RawStep], out_slots: Sequence[int], consts: Dict[str, Any], types: Dict[str, Any],
         fixed: Dict[int, Any], record: Optional[Dict[str, Any]] = None
         ) -> Tuple[List[RawStep], Dict[str, int], Dict[str, Any]]:
    """raw_steps with the chains above each replaced by one step; how many of each were fused; and the
    record of this outcome (JSON-able: which steps each pass rewrote, with their probes' outcomes).

    consts: constant variables by name; types: variable types by name; fixed: the values of the
    constant slots the steps read. record: the record of an earlier fusion of these very steps (same
    program, same `code_key()`): then only the recorded anchors are matched, their structure checked
    again, and their probes answered from the record; a record that does not fit (other steps, a
    match that no longer happens) is dropped and the steps fused afresh (the returned record is then
    a new one)."""
    if record is not None:
        try:
            if record["n"] == len(raw_steps):
                out, counts = _fuse(raw_steps, out_slots, consts, types, fixed, record["passes"], None)
                if counts == record["counts"]:
                    return out, counts, record
        except (_Stale, KeyError, TypeError, ValueError, IndexError):  # a damaged or foreign record
            pass
    log: List[List[Any]] = []
    out, counts = _fuse(raw_steps, out_slots, consts, types, fixed, None, log)
    return out, counts, {"n": len(raw_steps), "passes": log, "counts": counts}


def _fuse(raw_steps: List[RawStep], out_slots: Sequence[int], consts: Dict[str, Any], types: Dict[str, Any],
          fixed: Dict[int, Any], replay: Optional[List[Any]], log: Optional[List[Any]]
          ) -> Tuple[List[RawStep], Dict[str, int]]:
    if replay is not None and (not isinstance(replay, list) or len(replay) != len(_MATCHERS) + 1):
        raise _Stale("a record of other passes")
    counts: Dict[str, int] = {}
    for k, matcher in enumerate(_MATCHERS):
        raw_steps = _rewrite(raw_steps, out_slots, fixed, lambda g, i, p, m=matcher: m(g, i, consts, types, p),
                             counts, None if replay is None else replay[k], log)
    raw_steps = _rewrite(raw_steps, out_slots, fixed, lambda g, i, p: _match_views(g, i, types, p), counts,
                         None if replay is None else replay[-1], log, backwards=True)
    raw_steps, counts["int_concat"] = _fast_int_concats(raw_steps, fixed)
    raw_steps, counts["folded_int_concats"] = _fold_int_concats(raw_steps, out_slots)
    raw_steps, counts["folded_views"] = _fold_views(raw_steps, out_slots)
    return raw_steps, {k: v for k, v in counts.items() if v}


def _rewrite(raw_steps: List[RawStep], out_slots: Sequence[int], fixed: Dict[int, Any], match: Callable,
             counts: Dict[str, int], replay: Optional[List[Any]], log: Optional[List[Any]],
             backwards: bool = False) -> List[RawStep]:
    """One pass of a matcher over the steps: each match's steps are dropped and the fused step takes
    the place of the chain's last step (all of the chain's outside inputs exist by then).

    replay: the pass's recorded anchors ([step index, its op type, its probes' outcomes] of each match
    taken), visited instead of every step; log: where this pass's record is appended."""
    g = _Graph(raw_steps, out_slots, fixed)
    taken: Dict[int, Optional[RawStep]] = {}
    if replay is None:
        order: Sequence[int] = range(len(raw_steps) - 1, -1, -1) if backwards else range(len(raw_steps))
        anchors = None
    else:
        anchors = {}
        for i, op_type, noted in replay:  # (a malformed record raises TypeError / ValueError: dropped)
            if type(i) is not int or not 0 <= i < len(raw_steps) or raw_steps[i][1].type != op_type or i in anchors:
                raise _Stale("a record of other steps")
            anchors[i] = noted
        order = list(anchors)
    noted_pass: List[List[Any]] = []
    for i in order:
        if i in taken:
            if anchors is not None:
                raise _Stale("a recorded match overlaps another")
            continue
        probe = _Probe(None if anchors is None else anchors[i])
        m = match(g, i, probe)
        ok = m is not None and not any(j in taken for j in m[0]) and max(m[0]) == i
        if anchors is not None and (not ok or not probe.spent()):
            raise _Stale("a recorded match that does not happen")
        if not ok:
            continue
        idx, step = m
        for j in idx:
            taken[j] = None
        taken[i] = step
        counts[step[1].type] = counts.get(step[1].type, 0) + 1
        noted_pass.append([i, raw_steps[i][1].type, probe.noted])
    if log is not None:
        log.append(noted_pass)
    if not taken:
        return raw_steps
    return [taken[i] if i in taken else st for i, st in enumerate(raw_steps) if taken.get(i, st) is not None]
