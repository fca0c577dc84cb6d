"""The native engine against a fake pure-Python backend and the null backend."""
import numpy as np
import pytest

from anemll_fast import _native
from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine, EngineError, EngineInputError
from anemll_fast.errors import ConfigError
from anemll_fast.sampling import SamplingSettings
from anemll_fast.testing.pipeline import PipelineInputError, PythonPipeline


def spec(shape, dtype="FLOAT16", enumerated=()):
    out = {"shape": list(shape), "data_type": dtype}
    if enumerated:
        out["enumerated_shapes"] = [list(s) for s in enumerated]
    return out


def fake_config(H=8, V=48, ctx=16, B=4, chunks=2, parts=2, split=False, argmax=False, sequential=False,
                update_mask=False):
    S = 1 if sequential else B
    kv = {"kv": spec([chunks, ctx, H])}

    def ffn(i, S, fn, file):
        inputs = {"hidden_states": spec([1, S, H]), "position_ids": spec([S], "INT32"),
                  "causal_mask": spec([1, 1, S, ctx]), "current_pos": spec([1], "INT32")}
        if update_mask:
            inputs["update_mask"] = spec([1, 1, ctx, S])
        out_s = 1 if (fn == "prefill" and i == chunks - 1) else S
        return {"file_path": file, "inputs": inputs, "outputs": {"output_hidden_states": spec([1, out_s, H])},
                "states": kv, "functions": ["infer", "prefill"], "function": fn}

    if argmax:
        head_out = {"argmax_idx": spec([parts], "INT32"), "argmax_val": spec([parts])}
    else:
        head_out = {f"logits{p + 1}": spec([1, 1, V // parts]) for p in range(parts)}
    return ModelConfig.from_dict({
        "shapes": {"batch_size": B, "context_length": ctx, "hidden_size": H, "vocab_size": V},
        "components": {
            "embeddings": {"file_path": "emb.fake", "inputs": {"input_ids": spec([1, 1], "INT32", [[1, B]])},
                           "outputs": {"hidden_states": spec([1, 1, H])}},
            "ffn_prefill": [ffn(i, S, "prefill", f"chunk{i}{'_pf' if split else ''}.fake") for i in range(chunks)],
            "ffn_infer": [ffn(i, 1, "infer", f"chunk{i}.fake") for i in range(chunks)],
            "lm_head": {"file_path": "head.fake", "inputs": {"hidden_states": spec([1, 1, H])},
                        "outputs": head_out},
        },
    })


class FakeState:
    def __init__(self, shape):
        self.kv = np.zeros(shape, np.float32)

    def reset(self):
        self.kv[:] = 0


class FakeModel:
    """A deterministic toy transformer with ANEMLL's I/O names: attention is a mean over the
    KV rows the causal mask lets through, so positions, masks and the cache all matter."""

    def __init__(self, backend, path, fn):
        self.b, self.path, self.fn = backend, path, fn
        self.calls = 0

    def make_state(self):
        return FakeState((self.b.chunks, self.b.ctx, self.b.H))

    def predict(self, inputs, state=None):
        self.calls += 1
        b = self.b
        if b.fail_on is not None and b.fail_on(self):
            raise RuntimeError("simulated backend failure")
        if self.path.startswith("emb"):
            ids = np.asarray(inputs["input_ids"])
            return {"hidden_states": b.table[ids].astype(np.float16)}
        if self.path.startswith("head"):
            h = np.asarray(inputs["hidden_states"], np.float32).reshape(-1)
            logits = (h @ b.W).astype(np.float16)
            if b.bad_head_shape:
                return {f"logits{p + 1}": part[None, None, :-1] for p, part in enumerate(np.split(logits, b.parts))}
            if b.argmax:
                parts = np.split(logits, b.parts)
                return {"argmax_idx": np.array([int(np.argmax(p)) for p in parts], np.int32),
                        "argmax_val": np.array([p.max() for p in parts], np.float16)}
            return {f"logits{p + 1}": part[None, None, :] for p, part in enumerate(np.split(logits, b.parts))}
        i = int(self.path[5])
        h = np.asarray(inputs["hidden_states"], np.float32)[0]
        pos = np.asarray(inputs["position_ids"])
        mask = np.asarray(inputs["causal_mask"])[0, 0]
        assert int(np.asarray(inputs["current_pos"])[0]) == int(pos[0])
        if "update_mask" in inputs:
            um = np.asarray(inputs["update_mask"])[0, 0]
            assert um.sum() == len(pos) and all(um[p, s] == 1 for s, p in enumerate(pos))
        for s, p in enumerate(pos):
            state.kv[i, p] = h[s]
        out = np.empty_like(h)
        for s in range(len(pos)):
            visible = mask[s] == 0
            x = h[s] + state.kv[i][visible].mean(0) @ b.M[i] / np.sqrt(b.H) + np.sin(pos[s] * (i + 1.3) + np.arange(b.H))
            out[s] = x / np.sqrt((x * x).mean() + 1e-6)
        out = out.astype(np.float16)[None]
        if self.fn == "prefill" and i == b.chunks - 1:
            out = out[:, -1:]
        return {"output_hidden_states": out}


class FakeBackend:
    def __init__(self, cfg, seed=0, argmax=False):
        s = cfg.shapes
        self.H, self.V, self.ctx, self.chunks = s.hidden_size, s.vocab_size, s.context_length, cfg.num_chunks
        self.parts, self.argmax = cfg.logits_parts, argmax
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(self.V, self.H)).astype(np.float16)
        self.M = rng.normal(size=(self.chunks, self.H, self.H)).astype(np.float32)
        self.W = (rng.normal(size=(self.H, self.V)) * 2).astype(np.float32)
        self.fail_on = None
        self.bad_head_shape = False
        self.models = []

    def load(self, path, function_name=None):
        m = FakeModel(self, path, function_name)
        self.models.append(m)
        return m


def python_generate(cfg, backend, prompt, n):
    """Greedy tokens of the plain Python orchestration (chat.py style) the engine must reproduce."""
    return PythonPipeline(cfg, backend).greedy(prompt, n)


PROMPTS = {"short": [5, 9, 2], "batch": [1, 2, 3, 4], "long": [7, 3, 11, 30, 2, 8, 9, 41, 6, 13, 5]}


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_equals_python_orchestration(chunks, split, prompt):
    cfg = fake_config(chunks=chunks, split=split)
    ids = PROMPTS[prompt]
    expected = python_generate(cfg, FakeBackend(cfg), ids, 6)
    eng = Engine(cfg, FakeBackend(cfg))
    assert eng.prefill_mode == "batch" and eng.state_count == 1
    assert eng.generate(ids, 6) == expected
    assert len(set(expected)) > 1  # the fake model is not degenerate


@pytest.mark.parametrize("mode", ["sequential_model", "infer_only", "update_mask", "multipart", "argmax"])
def test_prefill_modes_and_heads(mode):
    kw = {"sequential_model": dict(sequential=True), "update_mask": dict(update_mask=True),
          "multipart": dict(parts=4), "argmax": dict(argmax=True, parts=4)}.get(mode, {})
    cfg = fake_config(**kw)
    ids = PROMPTS["long"]
    expected = python_generate(fake_config(parts=kw.get("parts", 2)) if mode == "argmax" else cfg,
                               FakeBackend(cfg), ids, 5)
    eng = Engine(cfg, FakeBackend(cfg, argmax=mode == "argmax"), sequential_prefill=mode == "infer_only")
    assert eng.prefill_mode == {"sequential_model": "sequential", "infer_only": "infer"}.get(mode, "batch")
    assert eng.generate(ids, 5) == expected


def test_python_pipeline_argmax_head_and_bad_input():
    """The baseline itself: an argmax head (index within its part) picks what the logits head picks."""
    cfg = fake_config(argmax=True, parts=4)
    ids = PROMPTS["long"]
    want = python_generate(fake_config(parts=4), FakeBackend(cfg), ids, 6)
    pipe = PythonPipeline(cfg, FakeBackend(cfg, argmax=True))
    assert pipe.part_sizes == [12] * 4 and pipe.greedy(ids, 6) == want
    assert len(set(want)) > 1 and max(want) >= 12  # not all from the first part
    with pytest.raises(PipelineInputError, match="no tokens"):
        pipe.prefill([])
    with pytest.raises(PipelineInputError, match="context length 16"):
        pipe.prefill(list(range(10)), start=10)
    with pytest.raises(PipelineInputError, match="position 16"):
        pipe.infer(1, 16)


def test_tail_near_end_of_context_and_context_finish():
    cfg = fake_config(ctx=16, B=6)
    ids = list(range(1, 15))  # 14 tokens: a third batch at 12 would pass the context
    expected = python_generate(cfg, FakeBackend(cfg), ids, 10)
    eng = Engine(cfg, FakeBackend(cfg))
    out = eng.generate(ids, 10)
    assert out == expected and len(out) == 3  # from positions 13, 14, 15
    assert eng.finish_reason == "context"
    assert eng.counters["prefill"] == 2 * 2  # two batches, two chunks; the tail went through infer


def test_continuation_from_cached_prefix_prefills_only_new_tokens():
    cfg = fake_config(ctx=32)
    backend = FakeBackend(cfg)
    eng = Engine(cfg, backend)
    first = PROMPTS["long"]
    out = eng.generate(first, 3)
    convo = first + out[:2]  # the cache holds first + out[:2] (the last token was not fed)
    assert eng.cached_prefix(convo) == len(convo)
    follow = convo + [17, 4, 9]
    before = dict(eng.counters)
    got = eng.generate(follow, 4)
    # Only the 3 new tokens were prefilled: one batch per chunk.
    assert eng.counters["prefill"] - before["prefill"] == 2
    fresh = python_generate(cfg, FakeBackend(cfg), follow, 4)
    assert got == fresh


def test_reset_then_same_generation():
    cfg = fake_config()
    eng = Engine(cfg, FakeBackend(cfg))
    a = eng.generate(PROMPTS["long"], 5)
    eng.reset()
    assert eng.length == 0
    assert eng.generate(PROMPTS["long"], 5, start=0) == a


def test_stop_ids_and_sampling_seed():
    cfg = fake_config()
    eng = Engine(cfg, FakeBackend(cfg))
    first = eng.generate([3, 4], 8)
    eng.reset()
    assert eng.generate([3, 4], 8, start=0, stop_ids=[first[1]]) == first[:2]
    assert eng.finish_reason == "stop"
    eng.set_sampling(SamplingSettings(temperature=1.5, top_k=20, seed=9))
    eng.reset()
    a = eng.generate([3, 4], 10, start=0)
    eng.set_sampling(SamplingSettings(temperature=1.5, top_k=20, seed=9))
    eng.reset()
    assert eng.generate([3, 4], 10, start=0) == a


def test_logits_and_logprobs_exposed():
    cfg = fake_config()
    backend = FakeBackend(cfg)
    eng = Engine(cfg, backend, sampling=SamplingSettings(logprobs=3))
    tok = eng.generate([1, 2, 3], 1)[0]
    logits = eng.logits().astype(np.float64)
    assert tok == int(np.argmax(logits))
    chosen, top = eng.last_logprobs()
    lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
    assert chosen == pytest.approx(logits[tok] - lse, abs=1e-4)
    assert top[0][0] == tok and len(top) == 3


# ------------------------------------------------------------------ bad input
def test_token_ids_outside_vocab():
    cfg = fake_config(V=48)
    eng = Engine(cfg, FakeBackend(cfg))
    with pytest.raises(EngineInputError, match="token id 48"):
        eng.generate([1, 48], 2)
    with pytest.raises(EngineInputError, match="token id -1"):
        eng.prefill([-1])
    with pytest.raises(EngineInputError, match="token id 99"):
        eng.step(99, 0)
    with pytest.raises(EngineInputError, match="token id 50"):
        eng._eng.prefill(np.array([1, 50], np.int32), 0)  # the native check, below the Python one
    assert eng.generate([1, 2], 2)  # still usable


def test_prompt_longer_than_context_and_position_past_context():
    cfg = fake_config(ctx=16)
    eng = Engine(cfg, FakeBackend(cfg))
    with pytest.raises(EngineInputError, match="context length 16"):
        eng.generate(list(range(17)), 1)
    with pytest.raises(EngineInputError, match="context length 16"):
        eng.prefill(list(range(10)), start=0) or eng.prefill(list(range(10)), start=10)
    with pytest.raises(EngineInputError, match="position 16 is past the context length 16"):
        eng.step(1, 16)
    with pytest.raises(EngineInputError, match="leaves a gap"):
        eng.step(1, eng.length + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([1], -1)


def test_backend_error_mid_generation_then_usable():
    cfg = fake_config()
    backend = FakeBackend(cfg)
    eng = Engine(cfg, backend)
    expected = eng.generate(PROMPTS["long"], 6)
    eng.reset()
    calls = {"n": 0}

    def fail_third_head_call(model):
        if model.path.startswith("head"):
            calls["n"] += 1
            return calls["n"] == 3
        return False

    backend.fail_on = fail_third_head_call
    got = []
    with pytest.raises(EngineError, match="lm_head: prediction failed: RuntimeError: simulated backend failure") as info:
        for tok in eng.generate_tokens(PROMPTS["long"], 6, start=0):
            got.append(tok)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert got == expected[:2]
    backend.fail_on = None
    eng.reset()
    assert eng.generate(PROMPTS["long"], 6, start=0) == expected
    # A failure inside a chunk leaves the cache valid up to the failed position.
    backend.fail_on = lambda m: m.path.startswith("chunk1") and m.fn == "infer"
    with pytest.raises(EngineError, match=r"ffn_infer\[1\]"):
        eng.step(expected[0], len(PROMPTS["long"]))
    backend.fail_on = None
    assert eng.length == len(PROMPTS["long"])


def test_model_shapes_disagree_with_config():
    cfg = fake_config()
    backend = FakeBackend(cfg)
    backend.bad_head_shape = True
    eng = Engine(cfg, backend)
    with pytest.raises(EngineError, match=r"lm_head.*logits1.*\[1, 1, 23\].*\[1, 1, 24\]"):
        eng.generate([1, 2], 1)
    backend.bad_head_shape = False
    assert eng.generate([1, 2], 1)


def test_config_errors_name_component_and_tensor():
    cfg = fake_config()
    cfg.ffn_infer[1].inputs["causal_mask"].shape = (1, 1, 1, 15)
    with pytest.raises(ConfigError, match=r"ffn_infer\[1\]\.inputs\.causal_mask\.shape"):
        Engine(cfg, FakeBackend(fake_config()))
    cfg = fake_config()
    cfg.lm_head.outputs["logits2"].shape = (1, 1, 20)
    with pytest.raises(ConfigError, match="vocab_size"):
        Engine(cfg, "null")
    cfg = fake_config()
    cfg.ffn_prefill[0].inputs["position_ids"].data_type = "FLOAT32"
    with pytest.raises(ConfigError, match=r"ffn_prefill\[0\]\.inputs\.position_ids\.data_type"):
        Engine(cfg, "null")
    cfg = fake_config()
    del cfg.ffn_infer[0].inputs["current_pos"]
    with pytest.raises(ConfigError, match=r"ffn_infer\[0\]\.inputs\.current_pos: missing"):
        Engine(cfg, "null")


def test_argmax_head_refuses_sampling():
    cfg = fake_config(argmax=True, parts=4)
    eng = Engine(cfg, FakeBackend(cfg, argmax=True))
    with pytest.raises(EngineInputError, match="greedy"):
        eng.set_sampling(SamplingSettings(temperature=0.8))
    assert eng.generate([1, 2], 2)


def test_load_failure_is_an_engine_error():
    class Broken:
        def load(self, path, function_name=None):
            raise FileNotFoundError(path)

    with pytest.raises(EngineError, match="embeddings: cannot load emb.fake.*FileNotFoundError"):
        Engine(fake_config(), Broken())
    with pytest.raises(ValueError, match="backend"):
        Engine(fake_config(), "nope")
