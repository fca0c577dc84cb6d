"""Recurrent layers (rnn, gru, lstm) over x [seq, batch, input], stepped in numpy."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from anemll_fast.mil.ops.elementwise import _sigmoid
from anemll_fast.mil.ops.registry import BuildContext, Kernel, register

_ACT: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "linear": lambda x: x,
    # Core ML's fixed parameters for the parameterless names of these two
    "hard_sigmoid": lambda x: np.clip(np.float32(0.2) * x + np.float32(0.5), 0, 1),
    "sigmoid_hard": lambda x: np.clip(np.float32(0.2) * x + np.float32(0.5), 0, 1),
    "scaled_tanh": lambda x: np.tanh(x),
}


def _act(ctx: BuildContext, name: str, default: str) -> Callable[[np.ndarray], np.ndarray]:
    a = str(ctx.scalar(name, default)).lower()
    if a not in _ACT:
        raise ctx.bad(f"{name} {a!r} (one of {', '.join(sorted(_ACT))})")
    return _ACT[a]


def _weights(ctx: BuildContext, suffix: str, gates: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    wi = np.asarray(ctx.const("weight_ih" + suffix), dtype=np.float32)
    wh = np.asarray(ctx.const("weight_hh" + suffix), dtype=np.float32)
    b = ctx.const("bias" + suffix, None)
    h = wh.shape[1]
    if wi.shape[0] != gates * h or wh.shape[0] != gates * h:
        raise ctx.bad(f"weight_ih{suffix} {list(wi.shape)} / weight_hh{suffix} {list(wh.shape)} do not "
                      f"hold {gates} gates of hidden size {h}")
    b = np.zeros(gates * h, np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
    return wi, wh, b


def _direction(ctx: BuildContext, allowed: Tuple[str, ...]) -> str:
    d = str(ctx.scalar("direction", "forward")).lower()
    if d not in allowed:
        raise ctx.bad(f"direction {d!r} (one of {', '.join(allowed)})")
    return d


def _check_x(ctx: BuildContext, x: np.ndarray, wi: np.ndarray) -> None:
    if x.ndim != 3 or x.shape[2] != wi.shape[1]:
        raise ValueError(f"{ctx.label}: x of shape {list(x.shape)} for input size {wi.shape[1]} "
                         f"(expected [seq, batch, input])")


def _outputs(seq: List[np.ndarray], output_sequence: bool) -> np.ndarray:
    return np.stack(seq) if output_sequence else seq[-1][None]


@register("rnn")
def _rnn(ctx: BuildContext) -> Kernel:
    wi, wh, b = _weights(ctx, "", 1)
    act = _act(ctx, "activation", "tanh")
    reverse = _direction(ctx, ("forward", "reverse")) == "reverse"
    output_sequence = bool(ctx.scalar("output_sequence", False))

    def run(x, h0):
        _check_x(ctx, x, wi)
        h = np.asarray(h0, np.float32)
        steps = []
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            h = act(x[t] @ wi.T + h @ wh.T + b)
            steps.append(h)
        return _outputs(steps, output_sequence), h

    return Kernel(run, [ctx.ref("x"), ctx.ref("initial_h")])


@register("gru")
def _gru(ctx: BuildContext) -> Kernel:
    # gate blocks in [reset, output (candidate), update] order
    wi, wh, b = _weights(ctx, "", 3)
    input_bias = ctx.const("input_bias", None)
    bi = np.zeros_like(b) if input_bias is None else np.asarray(input_bias, np.float32).reshape(-1)
    rec = _act(ctx, "recurrent_activation", "sigmoid")
    act = _act(ctx, "activation", "tanh")
    reverse = _direction(ctx, ("forward", "reverse")) == "reverse"
    output_sequence = bool(ctx.scalar("output_sequence", False))
    reset_after = bool(ctx.scalar("reset_after", False))
    H = wh.shape[1]
    wr, wo, wz = (wi[i * H:(i + 1) * H] for i in range(3))
    hr, ho, hz = (wh[i * H:(i + 1) * H] for i in range(3))
    br, bo, bz = (b[i * H:(i + 1) * H] for i in range(3))
    ir, io, iz = (bi[i * H:(i + 1) * H] for i in range(3))

    def run(x, h0):
        _check_x(ctx, x, wi)
        h = np.asarray(h0, np.float32)
        steps = []
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            xt = x[t]
            r = rec(xt @ wr.T + ir + h @ hr.T + br)
            z = rec(xt @ wz.T + iz + h @ hz.T + bz)
            if reset_after:  # reset applied to the recurrent product
                o = act(xt @ wo.T + io + r * (h @ ho.T + bo))
            else:  # reset applied to the state before the product
                o = act(xt @ wo.T + io + (r * h) @ ho.T + bo)
            h = (1 - z) * o + z * h
            steps.append(h)
        return _outputs(steps, output_sequence), h

    return Kernel(run, [ctx.ref("x"), ctx.ref("initial_h")])


def _lstm_direction(x: np.ndarray, h: np.ndarray, c: np.ndarray, wi: np.ndarray, wh: np.ndarray,
                    b: np.ndarray, peep: Optional[np.ndarray], reverse: bool, acts, clip) -> Tuple:
    """One direction; gate blocks in [input, forget, output, cell] order. Outputs in time order."""
    rec, cell_act, out_act = acts
    H = wh.shape[1]
    pi, pf, po = (np.zeros(H, np.float32),) * 3 if peep is None else (peep[:H], peep[H:2 * H], peep[2 * H:])
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs: List[Optional[np.ndarray]] = [None] * x.shape[0]
    for t in order:
        g = x[t] @ wi.T + h @ wh.T + b
        i = rec(g[:, :H] + c * pi)
        f = rec(g[:, H:2 * H] + c * pf)
        z = cell_act(g[:, 3 * H:])
        c = f * c + i * z
        if clip is not None:
            c = np.clip(c, -clip, clip)
        o = rec(g[:, 2 * H:3 * H] + c * po)
        h = o * out_act(c)
        outs[t] = h
    return outs, h, c, list(order)


@register("lstm")
def _lstm(ctx: BuildContext) -> Kernel:
    direction = _direction(ctx, ("forward", "reverse", "bidirectional"))
    wi, wh, b = _weights(ctx, "", 4)
    peep = ctx.const("peephole", None)
    peep = None if peep is None else np.asarray(peep, np.float32).reshape(-1)
    back = None
    if direction == "bidirectional":
        wib, whb, bb = _weights(ctx, "_back", 4)
        pb = ctx.const("peephole_back", None)
        back = (wib, whb, bb, None if pb is None else np.asarray(pb, np.float32).reshape(-1))
    acts = (_act(ctx, "recurrent_activation", "sigmoid"), _act(ctx, "cell_activation", "tanh"),
            _act(ctx, "activation", "tanh"))
    clip = ctx.scalar("clip", None)
    clip = None if clip is None else np.float32(clip)
    output_sequence = bool(ctx.scalar("output_sequence", False))
    H = wh.shape[1]

    def run(x, h0, c0):
        _check_x(ctx, x, wi)
        h0 = np.asarray(h0, np.float32)
        c0 = np.asarray(c0, np.float32)
        fo, fh, fc, forder = _lstm_direction(x, h0[:, :H], c0[:, :H], wi, wh, b, peep,
                                             direction == "reverse", acts, clip)
        if back is None:
            seq = [fo[t] for t in forder]  # in processing order, last = final state
            return _outputs(seq, output_sequence), fh, fc
        bo, bh, bc, _ = _lstm_direction(x, h0[:, H:], c0[:, H:], *back, True, acts, clip)
        if output_sequence:
            y = np.stack([np.concatenate([fo[t], bo[t]], axis=-1) for t in range(x.shape[0])])
        else:
            # the final step of each direction: forward's last time, backward's first
            y = np.concatenate([fh, bh], axis=-1)[None]
        return y, np.concatenate([fh, bh], axis=-1), np.concatenate([fc, bc], axis=-1)

    return Kernel(run, [ctx.ref("x"), ctx.ref("initial_h"), ctx.ref("initial_c")])
