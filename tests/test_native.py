"""The native extension itself: build info, the allocation hook, the null backend."""
import numpy as np
import pytest

from anemll_fast import _native
from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine
from anemll_fast.sampling import SamplingSettings


def null_config(H=64, V=4096, ctx=128, B=16, chunks=2, parts=8):
    def t(shape, dtype="FLOAT16"):
        return {"shape": shape, "data_type": dtype}

    def ffn(S, fn):
        return {"file_path": "chunk.null", "function": fn, "functions": ["infer", "prefill"],
                "inputs": {"hidden_states": t([1, S, H]), "position_ids": t([S], "INT32"),
                           "causal_mask": t([1, 1, S, ctx]), "current_pos": t([1], "INT32"),
                           "update_mask": t([1, 1, ctx, S])},
                "outputs": {"output_hidden_states": t([1, S, H])},
                "states": {"kv": t([4, 2, ctx, 16])}}

    return ModelConfig.from_dict({
        "shapes": {"batch_size": B, "context_length": ctx, "hidden_size": H, "vocab_size": V},
        "components": {
            "embeddings": {"file_path": "emb.null",
                           "inputs": {"input_ids": {**t([1, 1], "INT32"), "enumerated_shapes": [[1, B]]}},
                           "outputs": {"hidden_states": t([1, 1, H])}},
            "ffn_prefill": [ffn(B, "prefill") for _ in range(chunks)],
            "ffn_infer": [ffn(1, "infer") for _ in range(chunks)],
            "lm_head": {"file_path": "head.null", "inputs": {"hidden_states": t([1, 1, H])},
                        "outputs": {f"logits{i + 1}": t([1, 1, V // parts]) for i in range(parts)}},
        },
    })


def test_build_info():
    info = _native.build_info()
    assert info["abi_version"] == _native.ABI_VERSION
    assert info["backend_abi_version"] == 1
    assert isinstance(info["compiler"], str) and info["compiler"]


def test_alloc_hook_is_live():
    _native.alloc_counting(True)
    try:
        before = _native.alloc_counter()
        _native.alloc_probe_once()
        assert _native.alloc_counter() == before + 1
    finally:
        _native.alloc_counting(False)


@pytest.mark.parametrize("sampling", [
    SamplingSettings(),
    SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                     presence_penalty=0.2, frequency_penalty=0.1, logit_bias={1: 2.0, 7: float("-inf")},
                     seed=3, logprobs=5),
    SamplingSettings(temperature=1.0, top_p=0.95, penalty_window=None),
], ids=["greedy", "full_chain", "no_top_k"])
def test_no_allocation_per_decode_step(sampling):
    eng = Engine(null_config(), "null", sampling=sampling)
    # Give the null backend's zero logits some shape so the samplers do real work.
    rng = np.random.default_rng(0)
    for part in eng._eng.logits_views():
        part[:] = rng.normal(size=part.shape).astype(np.float16)
    assert allocations_in_decode_steps(eng) == 0


def allocations_in_decode_steps(eng, steps=50):
    """operator new calls inside the library during `steps` decode steps, after a prefill and a warm-up."""
    eng.prefill(list(range(20)))
    tok = eng.step(19, 19)  # warm-up
    _native.alloc_counting(True)
    try:
        before = _native.alloc_counter()
        pos = 20
        for _ in range(steps):
            tok = eng._eng.step(tok, pos)
            pos += 1
        return _native.alloc_counter() - before
    finally:
        _native.alloc_counting(False)


def test_null_backend_runs_the_whole_pipeline():
    eng = Engine(null_config(), "null")
    assert eng.prefill_mode == "batch"
    out = eng.generate(list(range(40)), 5)
    assert out == [0] * 5  # zero logits: argmax is token 0
    assert eng.counters == {"embed": 3 + 5, "prefill": 3 * 2, "infer": 5 * 2, "head": 5}


def test_engine_buffers_are_page_aligned():
    """Core ML asks for page-aligned MLMultiArray memory (MLPredictionOptions.h): every buffer the engine binds
    is, hidden states included (they are outputs of one part and inputs of the next)."""
    import os

    config = null_config(chunks=2)
    page = os.sysconf("SC_PAGESIZE")
    seen = {}

    class Recorder:
        def __init__(self, outputs):
            self.outputs = outputs

        def make_state(self):
            return object()

        def predict(self, inputs, state=None):
            for name, arr in inputs.items():
                seen[name] = arr.__array_interface__["data"][0]
            seq = inputs["input_ids"].shape[-1] if "input_ids" in inputs else None  # embeddings: [1, n, H]
            return {n: np.zeros(s if seq is None else [1, seq, s[-1]], np.float16) for n, s in self.outputs.items()}

    class Backend:
        def load(self, path, function_name):
            for _, comp in config.components():
                if comp.file_path == os.path.basename(path) and (comp.function or None) == function_name:
                    return Recorder({n: spec.shape for n, spec in comp.outputs.items()})
            raise AssertionError((path, function_name))

    eng = Engine(config, Backend())
    eng.generate(list(range(20)), 2)
    assert {"input_ids", "hidden_states", "position_ids", "causal_mask", "current_pos", "update_mask"} <= set(seen)
    misaligned = {n: a % page for n, a in seen.items() if a % page}
    assert not misaligned, f"not {page}-byte aligned: {misaligned}"
