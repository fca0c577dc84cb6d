"""The native sampler's per-step token mask (a grammar's allow-list over the fp16 logits parts)."""
import numpy as np
import pytest

from anemll_fast import _native
from anemll_fast.sampling import SamplingSettings
from test_samplers import chi_square_ok, np_filtered_probs


def bitmask(allowed, n_bits):
    """uint32 words with bit t%32 of word t//32 set for each allowed token."""
    words = np.zeros((n_bits + 31) // 32, np.uint32)
    for t in allowed:
        words[t >> 5] |= np.uint32(1 << (t & 31))
    return words


def uneven_parts(logits, sizes):
    """Parts whose boundaries fall inside 32-token words."""
    x = np.asarray(logits, np.float16)
    cuts = np.cumsum(sizes)[:-1]
    return [np.ascontiguousarray(p) for p in np.split(x, cuts)]


SIZES = [37, 50, 13, 100]  # 200 tokens, no part aligned to 32


def test_greedy_takes_the_best_allowed_token_across_unaligned_parts():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=200).astype(np.float16)
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    s = _native.NativeSampler(200, SamplingSettings().to_native())
    for allowed in ([int(order[5])], [int(order[3]), int(order[9])], [36, 37, 86, 87, 99, 100, 199], list(range(150, 200))):
        s.set_token_mask(bitmask(allowed, 200), 200)
        expect = max(allowed, key=lambda t: (float(logits[t]), -t))
        assert s.sample(uneven_parts(logits, SIZES)) == expect
    s.set_token_mask(None)
    assert s.sample(uneven_parts(logits, SIZES)) == int(order[0])


def test_tokens_past_n_bits_are_never_sampled():
    logits = np.zeros(200, np.float16)
    logits[190] = 10.0  # the best token, past the mask's bits
    s = _native.NativeSampler(200, SamplingSettings().to_native())
    s.set_token_mask(np.full(7, 0xFFFFFFFF, np.uint32), 180)  # words cover 224 bits, only 180 count
    assert s.sample(uneven_parts(logits, SIZES)) == 0
    s.set_token_mask(np.full(7, 0xFFFFFFFF, np.uint32), 200)
    assert s.sample(uneven_parts(logits, SIZES)) == 190


def test_mask_rewritten_in_place_takes_effect_at_the_next_step():
    logits = np.linspace(0, 1, 200).astype(np.float16)
    words = bitmask([3], 200)
    s = _native.NativeSampler(200, SamplingSettings().to_native())
    s.set_token_mask(words, 200)
    assert s.sample(uneven_parts(logits, SIZES)) == 3
    words[:] = bitmask([42, 77], 200)  # what a grammar matcher does between steps
    assert s.sample(uneven_parts(logits, SIZES)) == 77


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.8, top_p=0.8),
    dict(temperature=1.2, min_p=0.1),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.0, top_k=300),
    dict(temperature=0.9, repetition_penalty=1.5, logit_bias={11: 2.0, 12: 30.0}),
], ids=["plain", "top_p", "min_p", "top_k", "top_k_large", "bias_penalty"])
def test_distribution_under_a_mask_matches_numpy(kw):
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=200) * 1.5).astype(np.float16)
    allowed = sorted(set(rng.choice(200, size=40, replace=False).tolist()) | {11})  # 12 forbidden: bias cannot revive it
    history = [11, 11, 40]
    settings = SamplingSettings(seed=5, **kw)
    s = _native.NativeSampler(200, settings.to_native())
    s.set_token_mask(bitmask(allowed, 200), 200)
    samples = np.array([s.sample(uneven_parts(logits, SIZES), history) for _ in range(12000)])
    masked = logits.astype(np.float64)
    masked[[t for t in range(200) if t not in allowed]] = -np.inf
    expect = np_filtered_probs(masked, settings, history)
    assert set(np.unique(samples)) <= set(allowed)
    stat, critical = chi_square_ok(samples, expect)
    assert stat < critical, (stat, critical)


def test_chi_square_sees_an_ignored_mask():
    # Negative control: the unmasked distribution must fail the comparison above.
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=200) * 1.5).astype(np.float16)
    allowed = sorted(rng.choice(200, size=40, replace=False).tolist())
    s = _native.NativeSampler(200, SamplingSettings(temperature=1.0, seed=5).to_native())
    samples = np.array([s.sample(uneven_parts(logits, SIZES)) for _ in range(4000)])
    masked = logits.astype(np.float64)
    masked[[t for t in range(200) if t not in allowed]] = -np.inf
    with pytest.raises(AssertionError, match="outside the support"):
        chi_square_ok(samples, np_filtered_probs(masked, SamplingSettings(temperature=1.0)))


def test_logits_restored_and_logprobs_of_the_raw_distribution():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=200).astype(np.float16)
    parts = uneven_parts(logits, SIZES)
    s = _native.NativeSampler(200, SamplingSettings(temperature=0.7, logprobs=3, seed=1).to_native())
    s.set_token_mask(bitmask([5, 6, 150], 200), 200)
    tok = s.sample(parts)
    assert tok in (5, 6, 150)
    np.testing.assert_array_equal(np.concatenate(parts), logits)
    x = logits.astype(np.float64)
    lse = x.max() + np.log(np.exp(x - x.max()).sum())
    chosen, top = s.logprobs()
    assert chosen == pytest.approx(x[tok] - lse, abs=1e-4)
    assert [t for t, _ in top] == list(np.argsort(-x, kind="stable")[:3])


def test_everything_masked_is_a_clear_error():
    s = _native.NativeSampler(200, SamplingSettings().to_native())
    s.set_token_mask(bitmask([], 200), 200)
    with pytest.raises(ValueError, match="no token left.*token mask"):
        s.sample(uneven_parts(np.zeros(200), SIZES))
    s2 = _native.NativeSampler(200, SamplingSettings(temperature=1.0).to_native())
    s2.set_token_mask(bitmask([7], 200), 200)
    s2.set_token_mask(bitmask([], 200), 200)
    with pytest.raises(ValueError, match="no token left"):
        s2.sample(uneven_parts(np.zeros(200), SIZES))


@pytest.mark.parametrize("words, n_bits, match", [
    (np.zeros(7, np.float32), 200, "int32 or uint32"),
    (np.zeros((2, 7), np.uint32), 200, "1-D"),
    (np.zeros(14, np.uint32)[::2], 200, "C-contiguous"),
    (np.zeros(6, np.uint32), 200, "fewer than n_bits"),
    (np.zeros(7, np.uint32), 0, "n_bits must be > 0"),
    ([1, 2, 3], 64, "numpy array"),
])
def test_bad_masks_are_refused(words, n_bits, match):
    s = _native.NativeSampler(200, SamplingSettings().to_native())
    with pytest.raises(ValueError, match=match):
        s.set_token_mask(words, n_bits)


def _null_engine(**kw):
    from test_native import null_config

    from anemll_fast.engine import Engine

    return Engine(null_config(V=32768, parts=8), "null", **kw)


def test_engine_step_applies_the_mask_and_allocates_nothing():
    eng = _null_engine(sampling=SamplingSettings(temperature=0.8, top_p=0.9, seed=1))
    rng = np.random.default_rng(0)
    allowed = [17, 4100, 20000, 32767]
    for i, part in enumerate(eng._eng.logits_views()):
        part[:] = (rng.normal(size=part.shape) * 3).astype(np.float16)
        part[[t - i * 4096 for t in allowed if t // 4096 == i]] = 1.0  # equally likely, below the best
    words = np.zeros(32768 // 32, np.int32)  # int32, as llguidance fills it
    words[:] = bitmask(allowed, 32768).view(np.int32)
    eng.set_token_mask(words, 32768)
    eng.prefill(list(range(20)))
    tok = eng.step(19, 19)
    _native.alloc_counting(True)
    try:
        before = _native.alloc_counter()
        seen = set()
        for pos in range(20, 60):
            tok = eng._eng.step(tok, pos)
            seen.add(tok)
        used = _native.alloc_counter() - before
    finally:
        _native.alloc_counting(False)
    assert used == 0
    assert seen <= set(allowed) and len(seen) > 1
    eng.set_token_mask(None)
    assert {eng.step(tok, p) for p in range(60, 70)} - set(allowed)  # unmasked: the best tokens come back


def test_engine_generate_tokens_drives_a_constraint_and_clears_its_mask():
    eng = _null_engine()  # greedy; the null backend's logits stay zero: token 0 unless masked

    class Countdown:
        """Allows only token `left` (a toy grammar), then the stop token 1."""

        n_bits = 32768

        def __init__(self):
            self.mask = np.zeros(1024, np.uint32)
            self.left = 5
            self.accepted = []

        def fill_mask(self):
            self.mask[:] = bitmask([self.left + 100 if self.left else 1], 32768)

        def accept(self, token):
            self.accepted.append(token)
            self.left -= 1

    c = Countdown()
    out = eng.generate(list(range(10)), 20, stop_ids=[1], constraint=c)
    assert out == [105, 104, 103, 102, 101, 1] and c.accepted == out
    assert eng.finish_reason == "stop"
    assert eng.generate(list(range(10)), 3) == [0, 0, 0]  # the mask is gone afterwards


def test_argmax_head_refuses_a_mask():
    from test_native import null_config

    from anemll_fast.config import ModelConfig
    from anemll_fast.engine import Engine

    d = null_config(V=4096, parts=8).to_dict()
    head = d["components"]["lm_head"]
    head["outputs"] = {"argmax_idx": {"shape": [8], "data_type": "INT32"},
                       "argmax_val": {"shape": [8], "data_type": "FLOAT16"}}
    d["model_info"] = {**d.get("model_info", {}), "argmax_in_model": True}
    eng = Engine(ModelConfig.from_dict(d), "null")
    with pytest.raises(ValueError, match="argmax.*grammar"):
        eng.set_token_mask(np.full(128, -1, np.int32), 4096)


def test_generate_with_response_format_on_a_tiny_model(tmp_path):
    pytest.importorskip("llguidance")
    import json

    import anemll_fast
    from anemll_fast.grammar import GrammarError
    from anemll_fast.testing.tiny import build_tiny_model

    tiny = build_tiny_model(tmp_path / "m", context_length=128, batch_size=16, vocab_size=300, split_lm_head=3)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -50, "maximum": 50},
                                               "s": {"enum": ["yes", "no"]}},
              "required": ["n", "s"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with anemll_fast.load(tiny.path, backend="reference") as model:
        for seed in range(4):
            text = anemll_fast.generate(model, "Answer:", max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
            value = json.loads(text)
            assert set(value) == {"n", "s"} and -50 <= value["n"] <= 50 and value["s"] in ("yes", "no")
        free = anemll_fast.generate(model, "Answer:", max_tokens=30, temperature=1.0, seed=0)
        with pytest.raises(ValueError):
            json.loads(free)  # negative control: the random model alone writes no JSON
        with pytest.raises(GrammarError, match="response_format.type"):
            anemll_fast.generate(model, "x", response_format={"type": "yaml"})
        # The mask is gone after a constrained generation (from a cleared cache: same numerics).
        model.engine.reset()
        free_again = anemll_fast.generate(model, "Answer:", max_tokens=30, temperature=1.0, seed=0)
        anemll_fast.generate(model, "Answer:", max_tokens=5, temperature=1.0, seed=0, response_format=fmt)
        model.engine.reset()
        assert anemll_fast.generate(model, "Answer:", max_tokens=30, temperature=1.0, seed=0) == free_again
