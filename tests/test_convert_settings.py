"""Converter settings real checkpoints use, end to end: a tiny model converted with each setting, run by the
native engine on the reference backend, agrees step by step with the independent numpy decoder."""
from __future__ import annotations

import numpy as np
import pytest

from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine
from anemll_fast.testing.tiny import build_tiny_model

# Llama 3.1/3.2 scaling with a small original context: of head_dim 16's eight frequencies (theta 10000,
# wavelengths 6.3, 20, 63, 200, ...) one stays, two are on the smooth ramp (16 < wavelength < 64) and five are
# divided by `factor`, all within the test's 32 positions.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

SETTINGS = {
    "rope_theta": dict(arch="llama", rope_theta=500000.0),
    "rope_scaling_llama3": dict(arch="llama", rope_scaling=LLAMA3_SCALING),
    "head_dim_not_hidden_over_heads": dict(arch="qwen3", head_dim=32),
    "rms_norm_eps": dict(arch="qwen3", rms_norm_eps=0.25),
    "qwen2_all_together": dict(arch="qwen2", rope_theta=1000000.0, head_dim=8, rms_norm_eps=1e-5),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_converted_model_agrees_with_the_reference_decoder(tmp_path, name):
    m = build_tiny_model(tmp_path / "m", context_length=32, batch_size=8, vocab_size=512, num_chunks=2,
                         **SETTINGS[name])
    eng = Engine(ModelConfig.from_anemll_dir(m.path), "reference")
    ref = m.reference()
    prompt = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 7, 250]
    got, logits = [], []
    for tok in eng.generate_tokens(prompt, 16):
        got.append(tok)
        logits.append(eng.logits())
    expected = [ref.prefill(prompt)]
    for tok in got[:-1]:
        expected.append(ref.step(tok))
    # Teacher-forced: every step's logits (fp16 model against float32 numpy), then the greedy tokens.
    np.testing.assert_allclose(np.array(logits, np.float32), np.array(expected), rtol=0, atol=0.03)
    assert got == [int(np.argmax(x)) for x in expected]
