"""Tensors in backend memory (backend_abi.h alloc_buffer): what the Core ML backend does with IOSurface-backed
pixel buffers, run here through the test backends' padded host buffers.

The decode hidden states and the logits live in the backend's memory: every part writes where the next part
reads (no engine buffer in between), the sampler reads the logits in place, row by row when rows are padded,
and only between map and unmap; a decode step allocates nothing.
"""
import numpy as np
import pytest

from anemll_fast import _native
from anemll_fast.backends import reference
from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine
from anemll_fast.sampling import SamplingSettings
from anemll_fast.testing.tiny import build_tiny_model
from test_native import allocations_in_decode_steps, null_config

PAD = 7  # odd on purpose: rows never line up by accident


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("bufs") / "m", arch="llama", context_length=32, batch_size=8,
                            num_chunks=2, tied=False, split_lm_head=4, seed=5)


def test_bad_row_pad_is_refused():
    with pytest.raises(ValueError, match="buffer_row_pad"):
        _native.NullBackend(buffer_row_pad=-1)


@pytest.mark.parametrize("sampling", [
    SamplingSettings(),
    SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                     logit_bias={1: 2.0}, seed=3, logprobs=5),
], ids=["greedy", "full_chain"])
def test_no_allocation_per_decode_step_with_backend_buffers(sampling):
    backend = _native.NullBackend(buffer_row_pad=PAD)
    eng = Engine(null_config(parts=8), backend, sampling=sampling)
    assert eng._eng.backend_buffers == 2 + 2 + 8  # decode and batch-prefill hidden states, eight logits parts
    rng = np.random.default_rng(0)
    for part in eng._eng.logits_views():
        part[:] = rng.normal(size=part.shape).astype(np.float16)
    assert allocations_in_decode_steps(eng) == 0
    stats = backend.buffer_stats()
    assert stats["maps"] == stats["unmaps"] >= 8 * 51 and stats["mapped"] == 0
    eng.close()
    assert backend.buffer_stats()["frees"] == backend.buffer_stats()["allocs"] == 12


def test_real_model_on_padded_backend_buffers_matches_the_reference(tiny):
    config = ModelConfig.from_anemll_dir(tiny.path)
    prompt = [3, 9, 27, 81, 243]
    plain = Engine(config, "reference")
    backend = _native.CallbackBackend(reference, buffer_row_pad=PAD)
    padded = Engine(config, backend)
    assert padded.prefill_mode == "batch"
    assert padded._eng.backend_buffers == 2 + 2 + 4  # prefill hidden states [1, 8, 64] in padded rows too
    expected = tiny.reference().greedy(prompt, 6)
    assert plain.generate(prompt, 6) == expected[:6]
    assert padded.generate(prompt, 6) == expected[:6]
    np.testing.assert_array_equal(padded.logits(), plain.logits())
    stats = backend.buffer_stats()
    assert stats["maps"] == stats["unmaps"] > 0 and stats["mapped"] == 0


class _FakeHead:
    """A backend whose head writes known logits shaped [1, rows, n] per part (other parts write zeros)."""

    def __init__(self, config, logits):
        self.config, self.logits = config, logits

    def load(self, path, function_name):
        import os

        for label, comp in self.config.components():
            if comp.file_path == os.path.basename(path) and (comp.function or None) == function_name:
                return _FakeModel(comp, self.logits if label == "lm_head" else None)
        raise AssertionError((path, function_name))


class _FakeModel:
    def __init__(self, comp, logits):
        self.comp, self.logits = comp, logits

    def make_state(self):
        return object()

    def predict(self, inputs, state=None):
        if self.logits is not None:
            return dict(self.logits)
        seq = inputs["input_ids"].shape[-1] if "input_ids" in inputs else None
        return {n: np.zeros(s.shape if seq is None else [1, seq, s.shape[-1]], np.float16)
                for n, s in self.comp.outputs.items()}


def test_sampler_reads_padded_multirow_logits_in_place():
    """Logits parts of several rows, padded by the backend (as pixel buffers of height > 1 are): the sampler
    reads every row where the backend keeps it and never the padding (filled with 65504, which would win)."""
    V, rows, parts = 512, 4, 2
    config = null_config(V=V, parts=parts)
    for spec in config.lm_head.outputs.values():
        spec.shape = [1, rows, V // parts // rows]
    rng = np.random.default_rng(1)
    full = rng.normal(size=V).astype(np.float16)
    best = 300  # part 1, row 1 of 4
    full[best] = 9.0
    logits = {f"logits{i + 1}": full[i * (V // parts):(i + 1) * (V // parts)].reshape(1, rows, -1)
              for i in range(parts)}
    backend = _native.CallbackBackend(_FakeHead(config, logits), buffer_row_pad=PAD)
    eng = Engine(config, backend)
    assert eng._eng.backend_buffers == 2 + 2 + parts
    assert eng.generate([1, 2, 3], 2) == [best, best]
    np.testing.assert_array_equal(eng.logits(), full)
    # Sampling reads the same values: top-k 1 at any temperature is the argmax.
    eng.set_sampling(SamplingSettings(temperature=1.5, top_k=1, seed=1))
    assert eng.generate([1, 2, 3], 1) == [best]
    # Without backend buffers the same model gives the same answer (the control).
    assert Engine(config, _native.CallbackBackend(_FakeHead(config, logits))).generate([1, 2, 3], 1) == [best]
