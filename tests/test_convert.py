"""Structure of tiny converted models against the ANEMLL layout (names, I/O, states, functions, ops, meta)."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import yaml

from anemll_fast.convert import OPS_USED, STATE_NAME
from anemll_fast.convert.package import load_spec
from anemll_fast.testing.tiny import build_tiny_model, load_weights

FP16, INT32 = 65552, 131104  # ArrayFeatureType.ArrayDataType enum values
# Ops the MIL interpreter implements; write_state is how coreml_update_state is stored in the protobuf.
INTERPRETER_OPS = {
    "conv", "matmul", "linear", "add", "sub", "mul", "real_div", "pow", "rsqrt", "reduce_mean", "reduce_sum",
    "reduce_max", "reduce_argmax", "layer_norm", "softmax", "silu", "gelu", "exp", "tanh", "sigmoid", "gather",
    "gather_along_axis", "concat", "split", "slice_by_index", "slice_update", "reshape", "transpose",
    "expand_dims", "squeeze", "tile", "select", "greater_equal", "less", "cast", "band_part",
    "scaled_dot_product_attention", "identity", "read_state", "coreml_update_state", "write_state",
    "constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "const",
}


def _array(feature):
    t = feature.type.multiArrayType
    return list(t.shape), t.dataType


def _ops(spec, fn):
    f = spec.mlProgram.functions[fn]
    return collections.Counter(op.type for blk in f.block_specializations.values() for op in blk.operations)


def _functions(spec):
    return {f.name: f for f in spec.description.functions}


CASES = [
    # arch, chunks, lut_ffn, lut_lmhead, lut_emb, split, argmax, tied
    ("llama", 1, None, None, None, 2, False, True),
    ("llama", 2, 4, 6, 8, 4, True, False),
    ("qwen2", 1, None, None, None, 2, False, False),
    ("qwen2", 2, 6, None, None, 8, True, True),
    ("qwen3", 1, 8, None, None, 2, False, True),
    ("qwen3", 2, None, 4, None, 16, True, False),
]


@pytest.mark.parametrize("arch,chunks,lut_ffn,lut_lmh,lut_emb,split,argmax,tied", CASES)
def test_tiny_model_layout(tmp_path, arch, chunks, lut_ffn, lut_lmh, lut_emb, split, argmax, tied):
    ctx, batch, H, L = 32, 8, 64, 2
    m = build_tiny_model(tmp_path / "m", arch, num_chunks=chunks, context_length=ctx, batch_size=batch,
                         hidden_size=H, num_layers=L, lut_ffn=lut_ffn, lut_lmhead=lut_lmh,
                         lut_embeddings=lut_emb, split_lm_head=split, argmax_head=argmax, tied=tied, seed=3)
    prefix = "llama" if arch == "llama" else "qwen"
    lut = lambda b: f"_lut{b}" if b else ""  # noqa: E731
    emb = m.path / f"{prefix}_embeddings{lut(lut_emb)}.mlpackage"
    head = m.path / f"{prefix}_lm_head{lut(lut_lmh)}.mlpackage"
    ffns = [m.path / f"{prefix}_FFN_PF{lut(lut_ffn)}_chunk_{i + 1:02d}of{chunks:02d}.mlpackage" for i in range(chunks)]
    names = sorted(p.name for p in m.path.iterdir())
    assert sorted(p.name for p in m.path.glob("*.mlpackage")) == sorted(p.name for p in [emb, head] + ffns)
    assert {"meta.yaml", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert not [n for n in names if "partial" in n]

    # meta.yaml: ANEMLL fields
    meta = yaml.safe_load((m.path / "meta.yaml").read_text())
    params = meta["model_info"]["parameters"]
    assert meta["model_info"]["architecture"] == arch
    assert params["context_length"] == ctx and params["batch_size"] == batch and params["num_chunks"] == chunks
    assert params["lut_ffn"] == (lut_ffn or "none") and params["lut_lmhead"] == (lut_lmh or "none")
    assert params["lut_embeddings"] == (lut_emb or "none")
    assert params["model_prefix"] == prefix and params["split_lm_head"] == split
    assert params["embeddings"] == emb.stem + ".mlmodelc" and params["lm_head"] == head.stem + ".mlmodelc"
    assert params["ffn"] == ffns[0].stem + ".mlmodelc"
    assert params["vocab_size"] == 512 and params["lm_head_chunk_sizes"] == [512 // split] * split
    assert params["argmax_in_model"] is argmax

    # embeddings
    spec = load_spec(emb)
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "input_ids" and _array(inp)[1] == INT32
    enum = [list(s.shape) for s in inp.type.multiArrayType.enumeratedShapes.shapes]
    assert enum == [[1, 1], [1, batch]]
    assert out.name == "hidden_states" and _array(out)[1] == FP16
    ops = _ops(spec, "main")
    assert ops["gather"] == 1 and (ops["constexpr_lut_to_dense"] == 1) == bool(lut_emb)
    assert spec.description.metadata.userDefined["com.anemll.context_length"] == str(ctx)

    # FFN chunks: multifunction, shared state, per-function I/O
    n_layers = [1, 1] if chunks == 2 else [2]
    for ci, path in enumerate(ffns):
        spec = load_spec(path)
        fns = _functions(spec)
        assert set(fns) == {"infer", "prefill"} and spec.description.defaultFunctionName == "infer"
        for fname, S in (("infer", 1), ("prefill", batch)):
            f = fns[fname]
            got = {i.name: _array(i) for i in f.input}
            assert got == {
                "hidden_states": ([1, S, H], FP16), "position_ids": ([S], INT32),
                "causal_mask": ([1, 1, S, ctx], FP16), "current_pos": ([1], INT32),
            }
            (st,) = f.state
            assert st.name == STATE_NAME
            arr = st.type.stateType.arrayType
            assert list(arr.shape) == [2 * L, 2, ctx, 16] and arr.dataType == FP16
            (o,) = f.output
            last = ci == chunks - 1
            assert o.name == "output_hidden_states" and _array(o) == ([1, 1 if (last and S > 1) else S, H], FP16)
            ops = _ops(spec, fname)
            assert set(ops) <= INTERPRETER_OPS, set(ops) - INTERPRETER_OPS
            assert set(ops) - {"write_state"} <= OPS_USED | {"identity"}
            skipped_mlp = 3 if (last and fname == "prefill") else 0
            assert ops["conv"] == 7 * n_layers[ci] - skipped_mlp
            assert ops["read_state"] == 1 and ops["write_state"] == 1
            assert ops["slice_update"] == 2 * n_layers[ci]
            assert ops["constexpr_lut_to_dense"] == (ops["conv"] if lut_ffn else 0)
            # input + post-attention norm per layer (+ q/k norms for Qwen3); the final norm on the last infer;
            # the last prefill layer skips its MLP and so its post-attention norm.
            per_layer = 2 + (2 if arch == "qwen3" else 0)
            expected = per_layer * n_layers[ci] + (1 if last and fname == "infer" else 0) - skipped_mlp // 3
            assert ops["layer_norm"] == expected
        md = spec.description.metadata.userDefined
        assert md["com.anemll.chunk_no"] == str(ci + 1) and md["com.anemll.num_chunks"] == str(chunks)
        assert md["com.anemll.context_length"] == str(ctx) and md["com.anemll.batch_size"] == str(batch)
        assert md["com.anemll.functions"] == "infer,prefill"
        if lut_ffn:
            assert md["com.anemll.lut_bits"] == str(lut_ffn)

    # LM head
    spec = load_spec(head)
    (inp,) = spec.description.input
    assert inp.name == "hidden_states" and _array(inp) == ([1, 1, H], FP16)
    outs = {o.name: _array(o) for o in spec.description.output}
    if argmax:
        assert outs == {"argmax_idx": ([split], INT32), "argmax_val": ([split], FP16)}
    else:
        assert outs == {f"logits{i + 1}": ([1, 1, 512 // split], FP16) for i in range(split)}
    ops = _ops(spec, "main")
    assert set(ops) <= INTERPRETER_OPS
    assert ops["conv"] == split and ops["constexpr_lut_to_dense"] == (split if lut_lmh else 0)
    if argmax:
        assert ops["reduce_argmax"] == split
    md = spec.description.metadata.userDefined
    assert md["com.anemll.argmax_in_model"] == ("true" if argmax else "false")

    # the numpy weights and config travel with the model
    w, cfg = load_weights(m.path)
    assert cfg == m.config and cfg.tie_word_embeddings == tied
    assert ("lm_head.weight" in w) == (not tied)
    np.testing.assert_array_equal(w["model.norm.weight"], m.weights["model.norm.weight"])


def test_tiny_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer

    m = build_tiny_model(tmp_path / "m", "qwen3")
    tok = Tokenizer.from_file(str(m.path / "tokenizer.json"))
    text = "Hello, wörld! <|im_start|>"
    ids = tok.encode(text).ids
    assert max(ids) < m.config.vocab_size and tok.decode(ids, skip_special_tokens=False) == text
    cfg = json.loads((m.path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and "im_start" in cfg["chat_template"]


def test_overwrite_replaces_complete_model(tmp_path):
    out = tmp_path / "m"
    build_tiny_model(out, "llama", split_lm_head=2)
    with pytest.raises(ValueError, match="not empty"):
        build_tiny_model(out, "llama")
    m = build_tiny_model(out, "llama", split_lm_head=4, overwrite=True)
    assert yaml.safe_load((m.path / "meta.yaml").read_text())["model_info"]["parameters"]["split_lm_head"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
