"""The native engine on tiny converted models through the reference backend (MIL interpreter)."""
import shutil

import numpy as np
import pytest

from anemll_fast.backends import reference
from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine

tiny = pytest.importorskip("anemll_fast.testing.tiny")

from anemll_fast.testing.pipeline import PythonPipeline  # noqa: E402

_CACHE = {}


def tiny_model(tmp_path_factory, **kw):
    key = tuple(sorted(kw.items()))
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("tiny") / "m"
        _CACHE[key] = tiny.build_tiny_model(out, context_length=32, batch_size=8, vocab_size=512, **kw)
    return _CACHE[key]


def split_config(model_dir):
    """The unified model rewritten as split FFN files: prefill and infer load from different paths."""
    cfg = ModelConfig.from_anemll_dir(model_dir)
    for comp in cfg.ffn_prefill:
        src = cfg.path_of(comp)
        dst = src.with_name(src.stem + "_prefill" + src.suffix)
        if not dst.exists():
            shutil.copytree(src, dst)
        comp.file_path = dst.name
    d = cfg.to_dict()
    d.pop("ffn_execution", None)
    cfg = ModelConfig.from_dict(d, model_dir=model_dir)
    assert cfg.ffn_execution == "split"
    return cfg


PROMPTS = {"shorter": [5, 9, 2, 77], "equal": list(range(10, 18)), "longer": [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46]}


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("execution", ["unified", "split"])
def test_greedy_matches_orchestration_and_numpy_reference(tmp_path_factory, chunks, execution):
    m = tiny_model(tmp_path_factory, num_chunks=chunks, num_layers=3)
    cfg = ModelConfig.from_anemll_dir(m.path) if execution == "unified" else split_config(m.path)
    eng = Engine(cfg, "reference")
    for name, prompt in PROMPTS.items():
        eng.reset()
        got = eng.generate(prompt, 6, start=0)
        assert got == PythonPipeline(cfg, reference).greedy(prompt, 6), name
        assert got == m.reference().greedy(prompt, 6), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequential_model", "infer_prefill", "multipart", "argmax"])
def test_prefill_modes_and_heads(tmp_path_factory, kind):
    kw = {"sequential_model": dict(), "multipart": dict(split_lm_head=8), "argmax": dict(argmax_head=True)}.get(kind, {})
    if kind == "sequential_model":
        m = tiny.build_tiny_model(tmp_path_factory.mktemp("seq") / "m", context_length=32, batch_size=1,
                                  vocab_size=512)
    else:
        m = tiny_model(tmp_path_factory, num_chunks=2, **kw)
    cfg = ModelConfig.from_anemll_dir(m.path)
    eng = Engine(cfg, "reference", sequential_prefill=kind == "infer_prefill")
    assert eng.prefill_mode == {"sequential_model": "sequential", "infer_prefill": "infer"}.get(kind, "batch")
    prompt = PROMPTS["longer"]
    want = m.reference().greedy(prompt, 5)
    assert eng.generate(prompt, 5) == want
    assert PythonPipeline(cfg, reference).greedy(prompt, 5) == want  # the baseline reads every head kind too


@pytest.mark.slow
def test_continuation_from_cached_prefix(tmp_path_factory):
    m = tiny_model(tmp_path_factory, num_chunks=2)
    cfg = ModelConfig.from_anemll_dir(m.path)
    eng = Engine(cfg, "reference")
    first = PROMPTS["longer"]
    out = eng.generate(first, 3)
    follow = first + out[:2] + [17, 4, 9]
    before = eng.counters["prefill"]
    got = eng.generate(follow, 4)
    assert eng.counters["prefill"] - before == 2  # one batch of the 3 new tokens, two chunks
    assert got == m.reference().greedy(follow, 4)


def _divergent_prompts(hist):
    """Prompts that agree with the cached history `hist` up to a point and then differ."""
    other = lambda t: (t + 101) % 512  # noqa: E731
    mid = len(hist) // 2
    return {
        "at_0": ([other(hist[0])] + hist[1:] + [7], 0),
        "mid_prompt": (hist[:mid] + [other(hist[mid])] + hist[mid + 1:] + [7, 8], mid),
        "at_last_cached": (hist[:-1] + [other(hist[-1])] + [9], len(hist) - 1),
        "shorter_than_cache": (hist[:mid] + [other(hist[mid])], mid),
        "prefix_of_cache": (hist[:mid + 2], mid + 2),
    }


@pytest.mark.parametrize("case", ["at_0", "mid_prompt", "at_last_cached", "shorter_than_cache", "prefix_of_cache"])
def test_prefix_reuse_with_a_prompt_that_differs_from_the_cache(tmp_path_factory, case):
    m = tiny_model(tmp_path_factory, num_chunks=2)
    cfg = ModelConfig.from_anemll_dir(m.path)
    eng = Engine(cfg, "reference")
    first = PROMPTS["longer"]
    out = eng.generate(first, 4)
    hist = [int(t) for t in eng.history]
    assert hist == first + out[:3]
    prompt, agree = _divergent_prompts(hist)[case]
    assert eng.cached_prefix(prompt) == agree
    got = eng.generate(prompt, 4)
    got_logits = eng.logits()
    fresh = Engine(cfg, "reference")
    assert got == fresh.generate(prompt, 4)
    np.testing.assert_allclose(got_logits, fresh.logits(), rtol=0, atol=2e-2)
    ref = m.reference()
    assert got == ref.greedy(prompt, 4)
    # The last step (fed got[2], produced got[3]) against the numpy reference at the same position.
    np.testing.assert_allclose(got_logits, ref.prefill(prompt + got[:3]), rtol=0, atol=0.03)
