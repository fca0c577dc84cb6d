"""Attention over the valid keys only: a plan rewrite for the masked-attention chain.

ANEMLL's graphs attend over the whole KV cache (the context length) and hide the unwritten positions
with a causal mask of -inf. Core ML pays for that on the Neural Engine; on a CPU it makes every step
O(context). The chain

    s = matmul(q, k, transpose_y) -> reshape -> add(s, mask) -> softmax(axis=-1) -> reshape -> matmul(p, v)

gives exactly the same result when computed over the first L keys only, L being one past the last
key column that any query row can see (the columns after it are -inf in every row: exp() makes them
exact zeros, adding nothing to a softmax sum or to the product with v). The rewrite finds the chain in
a plan and replaces it by one step that measures L from the mask on each call and slices k, v and the
mask before computing, rounding to each op's declared dtype at the same points as the chain.

When the chain's ops are all fp16 (or all fp32) and the operands have the layout ANEMLL gives them
(contiguous q / k / v sharing leading dims, a mask of one row or of one row per query position), the
native kernel computes it (anemll_fast._kernels.attention: per kv head, two blocked matrix products
around a vectorized softmax row, causally masked work skipped where it provably cannot change a bit);
otherwise numpy does. Its float32 sums run in an order of their own, so a value is occasionally one fp16
step away from the op-by-op chain's (greedy tokens of the models in the tests are unchanged).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from anemll_fast.mil import fusion
from anemll_fast.mil.ops.reduction import softmax
from anemll_fast.mil.ops.registry import Kernel, unwrap
from anemll_fast.mil.program import TensorType, Value

RawStep = Tuple[Kernel, Any, List[int], List[int], List[Callable]]


def valid_keys(mask: np.ndarray) -> int:
    """One past the last key column that is not -inf in every row of the mask (its last axis)."""
    if fusion.native is not None and type(mask) is np.ndarray and mask.dtype == np.float32 and \
            mask.flags.c_contiguous:
        return fusion.native.open_columns(mask)
    m = mask.reshape(-1, mask.shape[-1])
    open_cols = np.flatnonzero(~np.isneginf(m).all(axis=0))
    return int(open_cols[-1]) + 1 if open_cols.size else 0


def _const(op: Any, name: str, consts: Dict[str, Any]) -> Any:
    """A constant input of an op, or None (absent or not a constant)."""
    binds = op.inputs.get(name)
    if not binds:
        return None
    b = binds[0]
    return b.data if isinstance(b, Value) else unwrap(consts.get(b))


def _flag(op: Any, name: str, consts: Dict[str, Any]) -> Optional[bool]:
    """A constant boolean input of an op (False when absent), None when it is not a constant."""
    if not op.inputs.get(name):
        return False
    v = _const(op, name, consts)
    return None if v is None else bool(np.asarray(v).reshape(-1)[0])


def _last_dim(op: Any) -> Optional[int]:
    t = op.outputs[0].type if op.outputs else None
    if isinstance(t, TensorType) and t.shape and t.shape[-1] is not None:
        return int(t.shape[-1])
    return None


def fuse(raw_steps: List[RawStep], out_slots: Sequence[int], consts: Dict[str, Any],
         fuse_native: Optional[bool] = None) -> Tuple[List[RawStep], int]:
    """raw_steps with each masked-attention chain replaced by one step; also the number replaced.

    fuse_native: whether the step may use the native kernel (see fusion.enabled)."""
    producer: Dict[int, int] = {}
    readers: Dict[int, int] = {}
    for i, (_k, _op, ins, outs, _f) in enumerate(raw_steps):
        for s in outs:
            producer[s] = i
        for s in ins:
            readers[s] = readers.get(s, 0) + 1
    for s in out_slots:
        readers[s] = readers.get(s, 0) + 1

    def sole(slot: int) -> bool:
        return readers.get(slot, 0) == 1

    def step_of(slot: int, op_type: str) -> Optional[int]:
        i = producer.get(slot)
        return i if i is not None and raw_steps[i][1].type == op_type and sole(slot) else None

    drop: Dict[int, Optional[RawStep]] = {}
    for i2, (k2, op2, ins2, outs2, fins2) in enumerate(raw_steps):
        if op2.type != "matmul" or len(ins2) != 2 or len(outs2) != 1 or i2 in drop:
            continue
        if _flag(op2, "transpose_x", consts) is not False or _flag(op2, "transpose_y", consts) is not False:
            continue
        ir2 = step_of(ins2[0], "reshape")
        ism = step_of(raw_steps[ir2][2][0], "softmax") if ir2 is not None else None
        iad = step_of(raw_steps[ism][2][0], "add") if ism is not None else None
        if iad is None:
            continue
        add_ins = raw_steps[iad][2]
        chain = None
        for pos in (0, 1):  # the scores may be either operand of the add; the other is the mask
            ir1 = step_of(add_ins[pos], "reshape")
            im1 = step_of(raw_steps[ir1][2][0], "matmul") if ir1 is not None else None
            if im1 is not None:
                chain = (im1, ir1, iad, ism, ir2, add_ins[1 - pos])
                break
        if chain is None:
            continue
        im1, ir1, iad, ism, ir2, mask_slot = chain
        op1 = raw_steps[im1][1]
        if _flag(op1, "transpose_x", consts) is not False or _flag(op1, "transpose_y", consts) is not True:
            continue
        axis_v = _const(raw_steps[ism][1], "axis", consts)
        n_keys = _last_dim(op1)
        if axis_v is None or int(np.asarray(axis_v).reshape(-1)[0]) != -1 or n_keys is None or \
                any(_last_dim(raw_steps[j][1]) != n_keys for j in (ir1, iad, ism, ir2)):
            continue
        q_slot, k_slot = raw_steps[im1][2]
        v_slot = ins2[1]
        shape1 = raw_steps[ir1][1].outputs[0].type.shape
        shape2 = raw_steps[ir2][1].outputs[0].type.shape
        if None in shape1 or None in shape2:
            continue
        fins = [raw_steps[j][4][0] for j in (im1, ir1, iad, ism, ir2)] + [fins2[0]]
        dts = {(op.outputs[0].type.dtype if isinstance(op.outputs[0].type, TensorType) else None)
               for op in [raw_steps[j][1] for j in (im1, ir1, iad, ism, ir2)] + [op2]}
        native = None
        if fusion.enabled(fuse_native) and dts in ({"fp16"}, {"fp32"}):
            native = dts == {"fp16"}
        kernel = Kernel(_fused(tuple(shape1), tuple(shape2), fins, native), [])
        for j in (im1, ir1, iad, ism, ir2):
            drop[j] = None
        # the fused step's own output needs no further rounding: it already applied matmul 2's
        drop[i2] = (kernel, op2, [q_slot, k_slot, mask_slot, v_slot], outs2, [lambda r: r])
    if not drop:
        return raw_steps, 0
    out = []
    for i, st in enumerate(raw_steps):
        if i in drop:
            if drop[i] is not None:
                out.append(drop[i])
        else:
            out.append(st)
    return out, sum(1 for v in drop.values() if v is not None)


def _fused(shape1: Tuple[int, ...], shape2: Tuple[int, ...], fins: List[Callable],
           native: Optional[bool] = None) -> Callable:
    """The chain as one function; `native` is None (numpy only) or whether the native kernel rounds
    to fp16."""
    f_mm1, f_r1, f_add, f_sm, f_r2, f_mm2 = fins
    # The native kernel's view of the chain: the reshapes between the matmuls only regroup rows (the
    # scores' rows are q's rows in q's order) and query row r meets mask row r % shape1[-2].
    lead, t1 = tuple(shape2[:-1]), shape1[-2]
    regroups = math.prod(shape1[:-1]) == math.prod(shape2[:-1]) and t1 > 0
    kernels = fusion.native if native is not None and regroups else None

    def run(q, k, mask, v):
        n = k.shape[-2]
        L = valid_keys(mask) if mask.shape[-1] == n else n
        if L == 0:  # nothing visible: the full computation's (NaN) result, as the chain gives it
            L = n
        if kernels is not None and q.shape[:-1] == lead and q.shape[-2] % t1 == 0 and mask.ndim >= 2 and \
                mask.shape[-2] in (1, t1):
            try:
                return kernels.attention(q, k, v, mask, L, native)
            except ValueError:  # a layout the kernel does not take (e.g. a non-contiguous cache view)
                pass
        s = f_mm1(np.matmul(q, np.swapaxes(k[..., :L, :], -1, -2)))
        s = f_r1(np.reshape(s, shape1[:-1] + (L,)))
        s = f_add(s + mask[..., :L])
        p = f_sm(softmax(s, -1))
        p = f_r2(np.reshape(p, shape2[:-1] + (L,)))
        return f_mm2(np.matmul(p, v[..., :L, :]))

    return run
