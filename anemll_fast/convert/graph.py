"""MIL programs of the three ANEMLL parts (embeddings, FFN chunk functions, LM head), built from numpy weights.

Only a small op vocabulary is used (see OPS_USED) so that our MIL interpreter can run every converted model.
Everything is fp16 like ANEMLL's models; linear layers are 1x1 convolutions on an NCHW [1, C, 1, S] layout.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from anemll_fast.convert.arch import ArchConfig
from anemll_fast.convert.weights import layer_prefix, lm_head_weight

STATE_NAME = "model_model_kv_cache_0"
# Gemma 3 (ANEMLL 0.3.5): sliding layers keep the last `sliding_window` positions, global layers the context.
LOCAL_STATE_NAME = "model_model_kv_cache_local"
GLOBAL_STATE_NAME = "model_model_kv_cache_global"

# Every op the builders below may emit (after coremltools' default passes), for documentation and tests.
OPS_USED = frozenset({
    "add", "mul", "concat", "conv", "coreml_update_state", "const", "expand_dims", "gather", "gelu", "layer_norm",
    "matmul", "read_state", "reduce_argmax", "reduce_max", "reshape", "silu", "slice_by_index", "slice_update",
    "softmax", "squeeze", "transpose", "constexpr_lut_to_dense",
})


def _mil():
    # Imported lazily: coremltools takes seconds to import and prints noise off macOS.
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    return mb, Function, Program, types, get_new_symbol


def rope_tables(cfg: ArchConfig, length: int, local: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [length, head_dim] in the rotate-half layout (each frequency repeated in both halves).

    local: Gemma 3's sliding layers, with their own base and no scaling."""
    d = cfg.head_dim
    theta = float(cfg.rope_local_theta) if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = {} if local else (cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling.get("factor", 1.0))
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)


def _llama3_scale(inv_freq: np.ndarray, s: Mapping) -> np.ndarray:
    # Llama 3.1 long-context frequency scaling: low frequencies divided by `factor`, a smooth ramp between.
    factor = float(s.get("factor", 8.0))
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Which layers one FFN chunk holds (global indices), and whether it is first/last."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


def plan_chunks(num_layers: int, num_chunks: int) -> List[ChunkPlan]:
    """Split layers into contiguous chunks, the first ones one layer larger when not divisible."""
    base, extra = divmod(num_layers, num_chunks)
    plans, start = [], 0
    for i in range(num_chunks):
        n = base + (1 if i < extra else 0)
        plans.append(ChunkPlan(i, num_chunks, start, start + n))
        start += n
    return plans


def _h(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float16)


def _conv_w(w: np.ndarray) -> np.ndarray:
    return _h(w).reshape(w.shape[0], w.shape[1], 1, 1)


class _Ops:
    """Small helpers over the MIL builder, so the graphs below read like the math."""

    def __init__(self, mb):
        self.mb = mb

    def slice_last(self, x, start: int, stop: int, shape: Sequence[int], name=None):
        r = len(shape)
        begin = [0] * (r - 1) + [start]
        end = list(shape[:-1]) + [stop]
        kw = {"name": name} if name else {}
        return self.mb.slice_by_index(x=x, begin=begin, end=end, **kw)

    def rms_norm(self, x, gamma: np.ndarray, eps: float, shape: Sequence[int], name=None):
        # RMSNorm as layer_norm over [x, -x] (zero mean by construction), as ANEMLL does: layer_norm keeps the
        # sum of squares in higher precision, whereas x*x overflows fp16 for the large activations of real models.
        mb = self.mb
        neg = mb.mul(x=x, y=np.float16(-1.0))
        both = mb.concat(values=[x, neg], axis=-1)
        g = _h(np.concatenate([gamma, gamma]))
        normed = mb.layer_norm(x=both, axes=[-1], gamma=g, epsilon=np.float16(eps))
        n = shape[-1]
        return self.slice_last(normed, 0, n, list(shape[:-1]) + [2 * n], name=name)

    def to_conv(self, x):
        # [1, S, C] -> [1, C, 1, S]
        return self.mb.expand_dims(x=self.mb.transpose(x=x, perm=[0, 2, 1]), axes=[2])

    def from_conv(self, y, name=None):
        # [1, C, 1, S] -> [1, S, C]
        kw = {"name": name} if name else {}
        return self.mb.transpose(x=self.mb.squeeze(x=y, axes=[2]), perm=[0, 2, 1], **kw)

    def conv(self, x, w: np.ndarray, b=None, name=None):
        kw = {"name": name} if name else {}
        if b is not None:
            kw["bias"] = _h(b)
        return self.mb.conv(x=x, weight=_conv_w(w), **kw)

    def rotate(self, x, cos, sin, shape: Sequence[int]):
        # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        mb = self.mb
        d = shape[-1]
        x1 = self.slice_last(x, 0, d // 2, shape)
        x2 = self.slice_last(x, d // 2, d, shape)
        rot = mb.concat(values=[mb.mul(x=x2, y=np.float16(-1.0)), x1], axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rot, y=sin))


def build_embeddings_program(cfg: ArchConfig, weights: Mapping[str, np.ndarray]):
    """input_ids int32 [1, S] (S symbolic: 1 or batch) -> hidden_states fp16 [1, S, H]."""
    mb, Function, Program, types, get_new_symbol = _mil()
    import coremltools as ct

    table = _h(weights["model.embed_tokens.weight"])
    seq = get_new_symbol()
    with Function({"input_ids": mb.placeholder(shape=(1, seq), dtype=types.int32)},
                  opset_version=ct.target.iOS18) as fn:
        if cfg.is_gemma3:  # Gemma scales embeddings by sqrt(hidden_size)
            out = mb.mul(x=mb.gather(x=table, indices=fn.inputs["input_ids"], axis=0),
                         y=np.float16(np.sqrt(cfg.hidden_size)), name="hidden_states")
        else:
            out = mb.gather(x=table, indices=fn.inputs["input_ids"], axis=0, name="hidden_states")
        fn.set_outputs([out])
    prog = Program()
    prog.add_function("main", fn)
    return prog


def state_layout(cfg: ArchConfig, context_length: int) -> Tuple[List[Tuple[str, Tuple[int, ...]]],
                                                                   Dict[int, Tuple[str, int, int, int]]]:
    """The KV-cache states [(name, shape)] and, per layer, (state, key index, value index, cache length).

    Llama/Qwen: one state [2*L, kv_heads, ctx, head_dim], keys of layer g at g, values at g + L.
    Gemma 3 (ANEMLL 0.3.5): kv_cache_local [2*sliding layers, kv, window, D] and kv_cache_global
    [2*global layers, kv, ctx, D], layers numbered within their kind.
    """
    L, nkv, D, C = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, context_length
    if not cfg.is_gemma3:
        return [(STATE_NAME, (2 * L, nkv, C, D))], {g: (STATE_NAME, g, g + L, C) for g in range(L)}
    window = min(int(cfg.sliding_window), C)
    states, layout = [], {}
    for name, sliding, length in ((LOCAL_STATE_NAME, True, window), (GLOBAL_STATE_NAME, False, C)):
        layers = [g for g in range(L) if cfg.is_sliding(g) == sliding]
        if not layers:
            continue
        states.append((name, (2 * len(layers), nkv, length, D)))
        for i, g in enumerate(layers):
            layout[g] = (name, i, i + len(layers), length)
    return states, layout


def build_ffn_program(cfg: ArchConfig, weights: Mapping[str, np.ndarray], chunk: ChunkPlan, *,
                      seq_len: int, context_length: int, prefill: bool, rotate: bool = False,
                      head: Optional[Tuple[int, bool]] = None):
    """One FFN chunk function (infer: seq_len=1, prefill: seq_len=batch) with the shared KV-cache state(s).

    rotate: Gemma 3's infer_rotate/prefill_rotate: sliding layers shift their cache left by seq_len and append.
    head: (parts, argmax) for a monolithic function: input_ids in, embeddings inside, LM head outputs out.
    See state_layout for the caches.
    """
    mb, Function, Program, types, _ = _mil()
    import coremltools as ct

    ops = _Ops(mb)
    H, D = cfg.hidden_size, cfg.head_dim
    nh, nkv, S, C = cfg.num_heads, cfg.num_kv_heads, seq_len, context_length
    rep = nh // nkv
    mono = head is not None
    gemma = cfg.is_gemma3
    states, layout = state_layout(cfg, C)
    tables = {False: rope_tables(cfg, 2 * C)}  # 2x margin like ANEMLL: padded prefill tails may index past ctx
    if gemma:
        tables[True] = rope_tables(cfg, 2 * C, local=True)

    def gain(w: np.ndarray) -> np.ndarray:
        return 1.0 + w if gemma else w  # Gemma's RMSNorm scales by (1 + weight)

    inputs = {}
    if mono:
        inputs["input_ids"] = mb.placeholder(shape=(1, S), dtype=types.int32)
    else:
        inputs["hidden_states"] = mb.placeholder(shape=(1, S, H), dtype=types.fp16)
    inputs["position_ids"] = mb.placeholder(shape=(S,), dtype=types.int32)
    inputs["causal_mask"] = mb.placeholder(shape=(1, 1, S, C), dtype=types.fp16)
    inputs["current_pos"] = mb.placeholder(shape=(1,), dtype=types.int32)
    for name, shape in states:
        inputs[name] = mb.state_tensor_placeholder(shape=shape, dtype=types.fp16)
    with Function(inputs, opset_version=ct.target.iOS18) as fn:
        if mono:
            x = mb.gather(x=_h(weights["model.embed_tokens.weight"]), indices=fn.inputs["input_ids"], axis=0)
            if gemma:
                x = mb.mul(x=x, y=np.float16(np.sqrt(H)))
        else:
            x = fn.inputs["hidden_states"]
        pos = fn.inputs["position_ids"]
        mask = fn.inputs["causal_mask"]
        cur = fn.inputs["current_pos"]
        rope = {}
        for local, (cos_t, sin_t) in tables.items():
            rope[local] = (mb.reshape(x=mb.gather(x=cos_t, indices=pos, axis=0), shape=[1, 1, S, D]),
                           mb.reshape(x=mb.gather(x=sin_t, indices=pos, axis=0), shape=[1, 1, S, D]))
        cur_end = mb.add(x=cur, y=np.int32(S))
        scale = np.float16(1.0 / np.sqrt(float(cfg.query_pre_attn_scalar) if gemma else D))
        used = sorted({layout[g][0] for g in range(chunk.start, chunk.stop)})
        # Every state is read, even one this chunk has no layer of: Core ML rejects unused state inputs, and
        # declaring every state in every chunk lets all of them share one MLState (as ANEMLL's chunks do).
        caches = {name: mb.read_state(input=fn.inputs[name]) for name, _ in states}

        for g in range(chunk.start, chunk.stop):
            p = layer_prefix(g)
            w = lambda n: weights[p + n]  # noqa: E731
            skip_mlp = prefill and chunk.is_last and g == chunk.stop - 1 and not mono
            sliding = cfg.is_sliding(g)

            h = ops.rms_norm(x, gain(w("input_layernorm.weight")), cfg.rms_norm_eps, (1, S, H))
            hc = ops.to_conv(h)
            bias = (lambda n: w(f"self_attn.{n}_proj.bias")) if cfg.qkv_bias else (lambda n: None)
            q = ops.conv(hc, w("self_attn.q_proj.weight"), bias("q"))
            k = ops.conv(hc, w("self_attn.k_proj.weight"), bias("k"))
            v = ops.conv(hc, w("self_attn.v_proj.weight"), bias("v"))
            # [1, heads*D, 1, S] -> [1, heads, S, D]
            q = mb.transpose(x=mb.reshape(x=q, shape=[1, nh, D, S]), perm=[0, 1, 3, 2])
            k = mb.transpose(x=mb.reshape(x=k, shape=[1, nkv, D, S]), perm=[0, 1, 3, 2])
            v = mb.transpose(x=mb.reshape(x=v, shape=[1, nkv, D, S]), perm=[0, 1, 3, 2])
            if cfg.qk_norm:
                q = ops.rms_norm(q, gain(w("self_attn.q_norm.weight")), cfg.rms_norm_eps, (1, nh, S, D))
                k = ops.rms_norm(k, gain(w("self_attn.k_norm.weight")), cfg.rms_norm_eps, (1, nkv, S, D))
            cos, sin = rope[sliding and gemma]
            q = ops.rotate(q, cos, sin, (1, nh, S, D))
            k = ops.rotate(k, cos, sin, (1, nkv, S, D))

            state, ki, vi, Lc = layout[g]
            cache = caches[state]
            for idx, upd in ((ki, k), (vi, v)):
                if rotate and sliding:
                    # Shift this layer's window left by S and append the S new entries.
                    kept = mb.slice_by_index(x=cache, begin=[idx, 0, S, 0], end=[idx + 1, nkv, Lc, D])
                    cache = mb.slice_update(x=cache, update=mb.concat(values=[kept, upd], axis=2),
                                            begin=[idx, 0, 0, 0], end=[idx + 1, nkv, Lc, D])
                else:
                    # Write at [current_pos, current_pos + S).
                    begin = mb.concat(values=[np.array([idx, 0], np.int32), cur, np.array([0], np.int32)], axis=0)
                    end = mb.concat(values=[np.array([idx + 1, nkv], np.int32), cur_end,
                                            np.array([D], np.int32)], axis=0)
                    cache = mb.slice_update(x=cache, update=upd, begin=begin, end=end)
            caches[state] = cache
            keys = mb.slice_by_index(x=cache, begin=[ki, 0, 0, 0], end=[ki + 1, nkv, Lc, D])
            vals = mb.slice_by_index(x=cache, begin=[vi, 0, 0, 0], end=[vi + 1, nkv, Lc, D])
            # Sliding layers see the first `window` mask columns (their cache holds the window), as in ANEMLL.
            layer_mask = mask if Lc == C else ops.slice_last(mask, 0, Lc, (1, 1, S, C))

            # Grouped-query attention: heads of one kv group are contiguous, so a reshape groups them.
            qg = mb.reshape(x=mb.mul(x=q, y=scale), shape=[1, nkv, rep * S, D])
            scores = mb.matmul(x=qg, y=keys, transpose_y=True)
            scores = mb.add(x=mb.reshape(x=scores, shape=[1, nh, S, Lc]), y=layer_mask)
            probs = mb.reshape(x=mb.softmax(x=scores, axis=-1), shape=[1, nkv, rep * S, Lc])
            attn = mb.reshape(x=mb.matmul(x=probs, y=vals), shape=[1, nh, S, D])
            attn = mb.reshape(x=mb.transpose(x=attn, perm=[0, 1, 3, 2]), shape=[1, nh * D, 1, S])
            attn = ops.from_conv(ops.conv(attn, w("self_attn.o_proj.weight")))
            if gemma:
                attn = ops.rms_norm(attn, gain(w("post_attention_layernorm.weight")), cfg.rms_norm_eps, (1, S, H))
            x = mb.add(x=x, y=attn)

            if skip_mlp:
                # The last layer's MLP feeds only the (discarded) prefill output: skip it, as ANEMLL does.
                continue
            pre = "pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight"
            h = ops.to_conv(ops.rms_norm(x, gain(w(pre)), cfg.rms_norm_eps, (1, S, H)))
            gate = ops.conv(h, w("mlp.gate_proj.weight"))
            gate = mb.gelu(x=gate, mode="TANH_APPROXIMATION") if gemma else mb.silu(x=gate)
            up = ops.conv(h, w("mlp.up_proj.weight"))
            mlp = ops.from_conv(ops.conv(mb.mul(x=gate, y=up), w("mlp.down_proj.weight")))
            if gemma:
                mlp = ops.rms_norm(mlp, gain(w("post_feedforward_layernorm.weight")), cfg.rms_norm_eps, (1, S, H))
            x = mb.add(x=x, y=mlp)

        for name in used:
            mb.coreml_update_state(state=fn.inputs[name], value=caches[name])
        final_gain = gain(weights["model.norm.weight"])
        if mono:
            # A monolithic prefill's head reads the first row only; its token comes from infer anyway.
            row = x if S == 1 else mb.slice_by_index(x=x, begin=[0, 0, 0], end=[1, 1, H])
            normed = ops.rms_norm(row, final_gain, cfg.rms_norm_eps, (1, 1, H))
            parts, argmax = head
            outs = _head_outputs(mb, ops, lm_head_weight(cfg, weights), normed, parts, argmax)
        elif chunk.is_last and prefill:
            # ANEMLL's last prefill chunk returns one row only; the first new token comes from `infer`.
            outs = [mb.slice_by_index(x=x, begin=[0, 0, 0], end=[1, 1, H], name="output_hidden_states")]
        elif chunk.is_last:
            outs = [ops.rms_norm(x, final_gain, cfg.rms_norm_eps, (1, S, H), name="output_hidden_states")]
        else:
            outs = [mb.identity(x=x, name="output_hidden_states")]
        fn.set_outputs(outs)
    prog = Program()
    prog.add_function("main", fn)
    return prog


def lm_head_parts(vocab_size: int, parts: int) -> List[int]:
    """Sizes of the logits parts (equal; validated elsewhere)."""
    return [vocab_size // parts] * parts


def _head_outputs(mb, ops, W: np.ndarray, hidden, parts: int, argmax: bool) -> list:
    """hidden [1,1,H] -> logits1..N [1,1,V/N], or argmax_idx int32 [N] + argmax_val fp16 [N].

    argmax_idx holds the index *within* each part (global id = part * V/N + idx), as ANEMLL's argmax heads do.
    """
    size = W.shape[0] // parts
    hc = ops.to_conv(hidden)
    outs, idxs, vals = [], [], []
    for i in range(parts):
        name = f"logits{i + 1}"
        y = ops.conv(hc, W[i * size:(i + 1) * size])
        logits = ops.from_conv(y, name=None if argmax else name)
        if argmax:
            idxs.append(mb.reduce_argmax(x=logits, axis=-1, keep_dims=True))  # [1,1,1]
            vals.append(mb.reduce_max(x=logits, axes=[-1], keep_dims=True))
        else:
            outs.append(logits)
    if argmax:
        idx = mb.reshape(x=mb.concat(values=idxs, axis=-1), shape=[parts], name="argmax_idx")
        val = mb.reshape(x=mb.concat(values=vals, axis=-1), shape=[parts], name="argmax_val")
        outs = [idx, val]
    return outs


def build_lm_head_program(cfg: ArchConfig, weights: Mapping[str, np.ndarray], *, parts: int, argmax: bool):
    """hidden_states [1,1,H] -> the head outputs of _head_outputs."""
    mb, Function, Program, types, _ = _mil()
    import coremltools as ct

    ops = _Ops(mb)
    with Function({"hidden_states": mb.placeholder(shape=(1, 1, cfg.hidden_size), dtype=types.fp16)},
                  opset_version=ct.target.iOS18) as fn:
        fn.set_outputs(_head_outputs(mb, ops, lm_head_weight(cfg, weights), fn.inputs["hidden_states"], parts,
                                     argmax))
    prog = Program()
    prog.add_function("main", fn)
    return prog
