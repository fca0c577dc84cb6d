"""Tiny converted ANEMLL models run through the reference backend equal the numpy reference decoder.

Pipeline as ANEMLL's chat.py runs it (embeddings -> FFN chunks -> LM head, one state shared by every
chunk and both functions): batched prefill, first token from `infer` on the last prompt position,
then 32 greedy decode steps. Tokens must be identical; logits must agree within fp16 tolerance:
|logit - reference| <= 0.03 * max(1, max|reference logits|) (fp16 weights and activations against a
float32 reference; observed ~0.1-0.2% on these models).
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

pytest.importorskip("coremltools")
tiny = pytest.importorskip("anemll_fast.testing.tiny")

from anemll_fast.backends.reference import ReferenceBackend  # noqa: E402
from anemll_fast.config import ModelConfig  # noqa: E402
from anemll_fast.mil import load_program  # noqa: E402
from anemll_fast.mil.text_writer import write_mlmodelc  # noqa: E402
from anemll_fast.testing.pipeline import PythonPipeline  # noqa: E402


def pipeline(model_dir) -> PythonPipeline:
    """ANEMLL's orchestration (after chat.py) over the reference backend."""
    return PythonPipeline(ModelConfig.from_anemll_dir(model_dir), ReferenceBackend)


CONTEXT, BATCH, STEPS = 48, 8, 32
PROMPT = [5, 17, 300, 42, 7, 99, 123, 250, 11, 3]  # longer than one batch: two prefill batches
LOGIT_TOL = 0.03


def lut_reference(model):
    """Numpy reference decoder over the weights the LUT packages actually hold.

    The palettized projections are read back from the packages (constexpr_lut_to_dense, decoded
    by the LUT routine unit-tested in test_mil_ops) and matched to Hugging Face names by position
    (chunks in order; per layer q, k, v, o, gate, up, down; LM-head parts in order), checked by
    shape and by closeness to the original float weights."""
    from anemll_fast.mil.ops.constexpr import lut_to_dense
    from anemll_fast.testing.reference import ReferenceDecoder

    def decoded(path):
        prog = load_program(str(path))
        fn = prog.function()
        consts = {op.outputs[0].name: op.const_value().data for op in fn.ops if op.type == "const"}
        val = lambda b: b.data if not isinstance(b, str) else consts[b]  # noqa: E731
        out = []
        for op in fn.ops:
            if op.type == "constexpr_lut_to_dense":
                w = lut_to_dense(np.asarray(val(op.inputs["indices"][0])),
                                 np.asarray(val(op.inputs["lut"][0]), np.float32), None)
                out.append(w.reshape(w.shape[0], -1))
        return out

    cfg = model.config.to_dict()
    weights = dict(model.weights)
    names = [f"model.layers.{layer}.{p}.weight" for layer in range(model.config.num_layers)
             for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    chunks = sorted(glob.glob(os.path.join(model.path, "*_FFN_PF*_chunk_*.mlpackage")))
    mats = [w for c in chunks for w in decoded(c)]
    head = decoded(glob.glob(os.path.join(model.path, "*_lm_head*.mlpackage"))[0])
    assert len(mats) == len(names) and head
    lm_src = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    for name, w in list(zip(names, mats)) + [("lm_head.weight", np.concatenate(head, 0))]:
        orig = weights.get(name, lm_src)
        assert w.shape == orig.shape, name
        assert np.abs(w - orig).max() <= 0.1 * np.abs(orig).max(), name  # a LUT approximation of it
        weights[name] = w
    cfg["tie_word_embeddings"] = False
    return ReferenceDecoder(weights, cfg, max_len=model.context_length)


def reference_run(model, prompt, steps, lut=False):
    ref = lut_reference(model) if lut else model.reference()
    logits = ref.prefill(prompt)
    toks, all_logits = [], [logits]
    for i in range(steps):
        t = int(np.argmax(logits))
        toks.append(t)
        if i == steps - 1:
            break
        logits = ref.step(t)
        all_logits.append(logits)
    return toks, all_logits


def check(model_dir, model, lut=False):
    pipe = pipeline(model_dir)
    assert (pipe.context, pipe.batch) == (CONTEXT, BATCH)
    toks, logits = pipe.greedy_with_logits(PROMPT, STEPS)
    ref_toks, ref_logits = reference_run(model, PROMPT, STEPS, lut)
    assert toks == ref_toks
    for got, want in zip(logits, ref_logits):
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got.astype(np.float32) - want).max()) <= LOGIT_TOL * scale


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("lut", [None, 6])
def test_greedy_matches_numpy_reference(tmp_path, arch, chunks, lut):
    model = tiny.build_tiny_model(tmp_path / "m", arch, num_chunks=chunks, context_length=CONTEXT,
                                  batch_size=BATCH, lut_ffn=lut, lut_lmhead=lut, seed=chunks)
    check(model.path, model, lut=bool(lut))


def test_mlmodelc_written_from_packages_gives_identical_outputs(tmp_path):
    """Every part rewritten as an .mlmodelc (model.mil text + weight.bin) computes the same logits."""
    model = tiny.build_tiny_model(tmp_path / "m", "qwen3", num_chunks=2, context_length=CONTEXT,
                                  batch_size=BATCH, lut_ffn=4)
    compiled = tmp_path / "c"
    compiled.mkdir()
    for name in os.listdir(model.path):
        if name.endswith(".mlpackage"):
            write_mlmodelc(load_program(str(model.path / name)), str(compiled / name.replace(".mlpackage", ".mlmodelc")))
    a = pipeline(model.path)
    b = pipeline(compiled)
    assert all(b.config.path_of(c).suffix == ".mlmodelc" for _, c in b.config.components())  # really compiled
    ta, la = a.greedy_with_logits(PROMPT, 8)
    tb, lb = b.greedy_with_logits(PROMPT, 8)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def test_enumerated_input_shapes_and_histogram(tmp_path):
    from anemll_fast.backends.reference import ReferenceBackend
    from anemll_fast.mil import MilInputError, op_histogram

    model = tiny.build_tiny_model(tmp_path / "m", "llama", num_chunks=1, context_length=16, batch_size=4,
                                  num_layers=1)
    emb = ReferenceBackend.load(glob.glob(os.path.join(model.path, "*_embeddings*.mlpackage"))[0])
    for n in (1, 4):
        assert emb.predict({"input_ids": np.zeros((1, n), np.int32)})["hidden_states"].shape == (1, n, 64)
    with pytest.raises(MilInputError, match=r"input 'input_ids' has shape \[1, 3\], expected one of \[1, 1\], \[1, 4\]"):
        emb.predict({"input_ids": np.zeros((1, 3), np.int32)})
    chunk = glob.glob(os.path.join(model.path, "*_FFN_PF*_chunk_*.mlpackage"))[0]
    hist = op_histogram(chunk)
    assert set(hist) == {"prefill", "infer"}
    assert hist["infer"]["read_state"] >= 1 and hist["infer"]["write_state"] >= 1 and hist["infer"]["conv"] >= 7
