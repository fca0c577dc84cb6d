"""MIL programs of the three ANEMLL parts (embeddings, FFN chunk functions, LM head), built from numpy weights.

Only a small op vocabulary is used (see OPS_USED) so that our MIL interpreter can run every converted model.
Everything is fp16 like ANEMLL's models; linear layers are 1x1 convolutions on an NCHW [1, C, 1, S] layout.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from anemll_fast.convert.arch import ArchConfig
from anemll_fast.convert.weights import layer_prefix, lm_head_weight

STATE_NAME = "model_model_kv_cache_0"

# Every op the builders below may emit (after coremltools' default passes), for documentation and tests.
OPS_USED = frozenset({
    "add", "mul", "concat", "conv", "coreml_update_state", "const", "expand_dims", "gather", "layer_norm",
    "matmul", "read_state", "reduce_argmax", "reduce_max", "reshape", "silu", "slice_by_index", "slice_update",
    "softmax", "squeeze", "transpose", "constexpr_lut_to_dense",
})


def _mil():
    # Imported lazily: coremltools takes seconds to import and prints noise off macOS.
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    return mb, Function, Program, types, get_new_symbol


def rope_tables(cfg: ArchConfig, length: int) -> Tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [length, head_dim] in the rotate-half layout (each frequency repeated in both halves)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
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
        out = mb.gather(x=table, indices=fn.inputs["input_ids"], axis=0, name="hidden_states")
        fn.set_outputs([out])
    prog = Program()
    prog.add_function("main", fn)
    return prog


def build_ffn_program(cfg: ArchConfig, weights: Mapping[str, np.ndarray], chunk: ChunkPlan, *,
                      seq_len: int, context_length: int, prefill: bool):
    """One FFN chunk function (infer: seq_len=1, prefill: seq_len=batch) with the shared KV-cache state.

    Cache layout [2*L, kv_heads, ctx, head_dim]: keys of global layer g at index g, values at g + L.
    """
    mb, Function, Program, types, _ = _mil()
    import coremltools as ct

    ops = _Ops(mb)
    L, H, D = cfg.num_layers, cfg.hidden_size, cfg.head_dim
    nh, nkv, S, C = cfg.num_heads, cfg.num_kv_heads, seq_len, context_length
    rep = nh // nkv
    cos_t, sin_t = rope_tables(cfg, 2 * C)  # 2x margin like ANEMLL: padded prefill tails may index past ctx

    inputs = {
        "hidden_states": mb.placeholder(shape=(1, S, H), dtype=types.fp16),
        "position_ids": mb.placeholder(shape=(S,), dtype=types.int32),
        "causal_mask": mb.placeholder(shape=(1, 1, S, C), dtype=types.fp16),
        "current_pos": mb.placeholder(shape=(1,), dtype=types.int32),
        STATE_NAME: mb.state_tensor_placeholder(shape=(2 * L, nkv, C, D), dtype=types.fp16),
    }
    with Function(inputs, opset_version=ct.target.iOS18) as fn:
        x = fn.inputs["hidden_states"]
        pos = fn.inputs["position_ids"]
        mask = fn.inputs["causal_mask"]
        cur = fn.inputs["current_pos"]
        state = fn.inputs[STATE_NAME]

        cos = mb.reshape(x=mb.gather(x=cos_t, indices=pos, axis=0), shape=[1, 1, S, D])
        sin = mb.reshape(x=mb.gather(x=sin_t, indices=pos, axis=0), shape=[1, 1, S, D])
        cur_end = mb.add(x=cur, y=np.int32(S))
        scale = np.float16(1.0 / np.sqrt(D))
        cache = mb.read_state(input=state)

        for g in range(chunk.start, chunk.stop):
            p = layer_prefix(g)
            w = lambda n: weights[p + n]  # noqa: E731
            skip_mlp = prefill and chunk.is_last and g == chunk.stop - 1

            h = ops.rms_norm(x, w("input_layernorm.weight"), cfg.rms_norm_eps, (1, S, H))
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
                q = ops.rms_norm(q, w("self_attn.q_norm.weight"), cfg.rms_norm_eps, (1, nh, S, D))
                k = ops.rms_norm(k, w("self_attn.k_norm.weight"), cfg.rms_norm_eps, (1, nkv, S, D))
            q = ops.rotate(q, cos, sin, (1, nh, S, D))
            k = ops.rotate(k, cos, sin, (1, nkv, S, D))

            # Write this layer's keys and values at [current_pos, current_pos + S).
            for idx, upd in ((g, k), (g + L, v)):
                begin = mb.concat(values=[np.array([idx, 0], np.int32), cur, np.array([0], np.int32)], axis=0)
                end = mb.concat(values=[np.array([idx + 1, nkv], np.int32), cur_end, np.array([D], np.int32)],
                                axis=0)
                cache = mb.slice_update(x=cache, update=upd, begin=begin, end=end)
            keys = mb.slice_by_index(x=cache, begin=[g, 0, 0, 0], end=[g + 1, nkv, C, D])
            vals = mb.slice_by_index(x=cache, begin=[g + L, 0, 0, 0], end=[g + L + 1, nkv, C, D])

            # Grouped-query attention: heads of one kv group are contiguous, so a reshape groups them.
            qg = mb.reshape(x=mb.mul(x=q, y=scale), shape=[1, nkv, rep * S, D])
            scores = mb.matmul(x=qg, y=keys, transpose_y=True)
            scores = mb.add(x=mb.reshape(x=scores, shape=[1, nh, S, C]), y=mask)
            probs = mb.reshape(x=mb.softmax(x=scores, axis=-1), shape=[1, nkv, rep * S, C])
            attn = mb.reshape(x=mb.matmul(x=probs, y=vals), shape=[1, nh, S, D])
            attn = mb.reshape(x=mb.transpose(x=attn, perm=[0, 1, 3, 2]), shape=[1, nh * D, 1, S])
            x = mb.add(x=x, y=ops.from_conv(ops.conv(attn, w("self_attn.o_proj.weight"))))

            if skip_mlp:
                # The last layer's MLP feeds only the (discarded) prefill output: skip it, as ANEMLL does.
                continue
            h = ops.to_conv(ops.rms_norm(x, w("post_attention_layernorm.weight"), cfg.rms_norm_eps, (1, S, H)))
            gate = mb.silu(x=ops.conv(h, w("mlp.gate_proj.weight")))
            up = ops.conv(h, w("mlp.up_proj.weight"))
            x = mb.add(x=x, y=ops.from_conv(ops.conv(mb.mul(x=gate, y=up), w("mlp.down_proj.weight"))))

        mb.coreml_update_state(state=state, value=cache)
        if chunk.is_last and prefill:
            # ANEMLL's last prefill chunk returns one row only; the first new token comes from `infer`.
            out = mb.slice_by_index(x=x, begin=[0, 0, 0], end=[1, 1, H], name="output_hidden_states")
        elif chunk.is_last:
            out = ops.rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps, (1, S, H),
                               name="output_hidden_states")
        else:
            out = mb.identity(x=x, name="output_hidden_states")
        fn.set_outputs([out])
    prog = Program()
    prog.add_function("main", fn)
    return prog


def lm_head_parts(vocab_size: int, parts: int) -> List[int]:
    """Sizes of the logits parts (equal; validated elsewhere)."""
    return [vocab_size // parts] * parts


def build_lm_head_program(cfg: ArchConfig, weights: Mapping[str, np.ndarray], *, parts: int, argmax: bool):
    """hidden_states [1,1,H] -> logits1..N [1,1,V/N], or argmax_idx int32 [N] + argmax_val fp16 [N].

    argmax_idx holds the index *within* each part (global id = part * V/N + idx), as ANEMLL's argmax heads do.
    """
    mb, Function, Program, types, _ = _mil()
    import coremltools as ct

    ops = _Ops(mb)
    H, V = cfg.hidden_size, cfg.vocab_size
    W = lm_head_weight(cfg, weights)
    size = V // parts
    with Function({"hidden_states": mb.placeholder(shape=(1, 1, H), dtype=types.fp16)},
                  opset_version=ct.target.iOS18) as fn:
        hc = ops.to_conv(fn.inputs["hidden_states"])
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
        fn.set_outputs(outs)
    prog = Program()
    prog.add_function("main", fn)
    return prog
