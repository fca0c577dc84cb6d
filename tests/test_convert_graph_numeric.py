"""The converter's MIL graphs compute the same decoder as the independent numpy reference.

Until the MIL interpreter (anemll_fast.mil) runs packages, this evaluates the MIL programs the converter builds
(before serialization, unpalettized) with a deliberately small numpy evaluator of just the ops they use,
rounding every op output to fp16 like the device. It drives them the ANEMLL way: padded batch prefill, then
`infer` from the last prompt position, then one token at a time.
"""
from __future__ import annotations

import numpy as np
import pytest

from anemll_fast.convert import STATE_NAME, ArchConfig, graph
from anemll_fast.convert.weights import random_weights
from anemll_fast.testing.reference import ReferenceDecoder

NEG = np.float16(-65504.0)  # ANEMLL's mask value (finfo(fp16).min)


def _slice(x, begin, end):
    return x[tuple(slice(int(b), int(e)) for b, e in zip(begin, end))]


def _eval(fn, feeds, state):
    env = {}
    for name, var in fn.inputs.items():
        env[var.name] = state if name == STATE_NAME else feeds[name]

    def v(var):
        if isinstance(var, (list, tuple)):
            return [v(x) for x in var]
        return env[var.name] if var.name in env else var.val

    for op in fn.operations:
        outs = op.outputs
        if all(o.val is not None for o in outs):
            for o in outs:
                env[o.name] = o.val
            continue
        a = {k: v(x) for k, x in op.inputs.items()}
        t = op.op_type
        if t == "gather":
            r = np.take(a["x"], a["indices"], axis=int(a["axis"]))
        elif t == "reshape":
            r = a["x"].reshape([int(s) for s in a["shape"]])
        elif t == "add":
            r = a["x"] + a["y"]
        elif t == "mul":
            r = a["x"].astype(np.float32) * a["y"]
        elif t == "concat":
            r = np.concatenate([np.asarray(x).reshape(np.shape(x) or (1,)) for x in a["values"]], axis=int(a["axis"]))
        elif t == "layer_norm":
            x = a["x"].astype(np.float32)
            ax = tuple(int(i) for i in a["axes"])
            mu = x.mean(axis=ax, keepdims=True)
            r = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=ax, keepdims=True) + float(a["epsilon"])) * a["gamma"]
        elif t == "slice_by_index":
            r = _slice(a["x"], a["begin"], a["end"])
        elif t == "transpose":
            r = np.transpose(a["x"], [int(p) for p in a["perm"]])
        elif t == "expand_dims":
            r = np.expand_dims(a["x"], tuple(int(i) for i in a["axes"]))
        elif t == "squeeze":
            r = np.squeeze(a["x"], tuple(int(i) for i in a["axes"]))
        elif t == "conv":
            w = a["weight"][:, :, 0, 0].astype(np.float32)
            r = np.einsum("oc,nchw->nohw", w, a["x"].astype(np.float32))
            if a.get("bias") is not None:
                r = r + a["bias"].astype(np.float32)[None, :, None, None]
        elif t == "silu":
            x = a["x"].astype(np.float32)
            r = x / (1 + np.exp(-x))
        elif t == "softmax":
            x = a["x"].astype(np.float32)
            e = np.exp(x - x.max(axis=int(a["axis"]), keepdims=True))
            r = e / e.sum(axis=int(a["axis"]), keepdims=True)
        elif t == "matmul":
            x, y = a["x"].astype(np.float32), a["y"].astype(np.float32)
            if a.get("transpose_x"):
                x = np.swapaxes(x, -1, -2)
            if a.get("transpose_y"):
                y = np.swapaxes(y, -1, -2)
            r = x @ y
        elif t == "read_state":
            r = a["input"].copy()
        elif t == "slice_update":
            r = a["x"].copy()
            r[tuple(slice(int(b), int(e)) for b, e in zip(a["begin"], a["end"]))] = a["update"]
        elif t == "coreml_update_state":
            a["state"][...] = a["value"]
            r = a["value"]
        elif t == "identity":
            r = a["x"]
        elif t == "reduce_argmax":
            r = np.argmax(a["x"], axis=int(a["axis"]))
            r = np.expand_dims(r, int(a["axis"])).astype(np.int32) if a.get("keep_dims") else r.astype(np.int32)
        elif t == "reduce_max":
            r = a["x"].max(axis=tuple(int(i) for i in a["axes"]), keepdims=bool(a.get("keep_dims")))
        else:
            raise NotImplementedError(t)
        r = np.asarray(r)
        if r.dtype.kind == "f":
            r = r.astype(np.float16)  # every op output is fp16 on the device
        env[outs[0].name] = r
    return {o.name: env[o.name] for o in fn.outputs}


@pytest.mark.parametrize("arch,chunks,argmax", [("llama", 1, False), ("qwen2", 2, True), ("qwen3", 2, False)])
def test_graphs_match_reference(arch, chunks, argmax):
    ctx, batch, parts = 16, 8, 4
    cfg = ArchConfig(arch=arch, vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=8, tie_word_embeddings=(arch != "qwen2"))
    w = random_weights(cfg, 7)
    emb = graph.build_embeddings_program(cfg, w).functions["main"]
    plans = graph.plan_chunks(cfg.num_layers, chunks)
    fns = {(c.index, pf): graph.build_ffn_program(cfg, w, c, seq_len=batch if pf else 1, context_length=ctx,
                                                  prefill=pf).functions["main"]
           for c in plans for pf in (False, True)}
    head = graph.build_lm_head_program(cfg, w, parts=parts, argmax=argmax).functions["main"]
    state = np.zeros((2 * cfg.num_layers, cfg.num_kv_heads, ctx, cfg.head_dim), np.float16)
    full_mask = np.where(np.arange(ctx)[None, :] <= np.arange(ctx)[:, None], 0, NEG).astype(np.float16)

    def run_chunks(hidden, pos, n, prefill):
        for c in plans:
            feeds = {"hidden_states": hidden, "position_ids": np.arange(pos, pos + n, dtype=np.int32),
                     "causal_mask": full_mask[None, None, pos:pos + n], "current_pos": np.array([pos], np.int32)}
            hidden = _eval(fns[(c.index, prefill)], feeds, state)["output_hidden_states"]
        return hidden

    def infer(token, pos):
        h = _eval(emb, {"input_ids": np.array([[token]], np.int32)}, None)["hidden_states"]
        out = _eval(head, {"hidden_states": run_chunks(h, pos, 1, False)}, None)
        if argmax:
            idx, val = out["argmax_idx"], out["argmax_val"]
            best = int(np.argmax(val))
            return best * (cfg.vocab_size // parts) + int(idx[best]), None
        logits = np.concatenate([out[f"logits{i + 1}"] for i in range(parts)], axis=-1)[0, 0].astype(np.float32)
        return int(np.argmax(logits)), logits

    prompt = [3, 141, 59, 26, 53]
    ids = np.zeros((1, batch), np.int32)
    ids[0, :len(prompt)] = prompt
    h = _eval(emb, {"input_ids": ids}, None)["hidden_states"]
    assert h.shape == (1, batch, cfg.hidden_size)
    out = run_chunks(h, 0, batch, True)
    assert out.shape == (1, 1, cfg.hidden_size)

    ref = ReferenceDecoder(w, cfg, max_len=ctx)
    ref_logits = ref.prefill(prompt)
    pos, token = len(prompt) - 1, prompt[-1]
    for step in range(6):
        got, logits = infer(token, pos)
        if logits is not None:
            scale = np.abs(ref_logits).max()
            np.testing.assert_allclose(logits, ref_logits, atol=0.03 * scale, err_msg=f"step {step}")
        top2 = np.sort(ref_logits)[-2:]
        if top2[1] - top2[0] > 0.05 * np.abs(ref_logits).max():  # skip near-ties fp16 may flip
            assert got == int(np.argmax(ref_logits)), f"step {step}"
        token = int(np.argmax(ref_logits))
        pos += 1
        ref_logits = ref.step(token)
