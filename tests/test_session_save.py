"""ChatSession save/load, bare prompt caches, and a reply stopped early staying in the history."""
import json
import math
import zipfile

import numpy as np
import pytest

import anemll_fast
from anemll_fast.chat import ChatSession
from anemll_fast.generate import stream_generate
from anemll_fast.prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache
from anemll_fast.testing.tiny import build_tiny_model


def build(tmp, name, **kw):
    opts = dict(arch="qwen3", num_chunks=2, context_length=192, batch_size=8, tied=False, split_lm_head=2, seed=21)
    opts.update(kw)
    return build_tiny_model(tmp / name, **opts)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("save")
    return {"a": build(tmp, "a"), "other_weights": build(tmp, "b", seed=22),
            "other_context": build(tmp, "c", context_length=64)}


@pytest.fixture
def model(models):
    with anemll_fast.load(models["a"].path, backend="reference") as m:
        yield m


@pytest.fixture(scope="module")
def ascii_bias(models):
    with anemll_fast.load(models["a"].path, backend="reference") as m:
        tok = m.tokenizer
        allowed = {tok.encode(chr(c))[0] for c in range(32, 127)}
        return {i: -math.inf for i in range(m.config.shapes.vocab_size) if i not in allowed}


SYSTEM = "You are careful. " * 2


def test_session_saved_and_loaded_continues_identically(models, model, tmp_path, ascii_bias):
    kw = dict(max_tokens=6, logit_bias=ascii_bias)
    chat = ChatSession(model, system=SYSTEM, **kw)
    chat.send("First question?")
    path = tmp_path / "chat.npz"
    chat.save(path)
    expected = chat.send("And then?")
    with anemll_fast.load(models["a"].path, backend="reference") as fresh:
        again = ChatSession(fresh, **kw).load(path)
        assert again.system == SYSTEM and again.messages == chat.messages[:-2]
        got = again.send("And then?")
        assert got == expected
        # Only the new turn was prefilled: the saved history came from the file.
        full = len(again.prompt_ids()) - len(fresh.tokenizer.encode(got))
        assert 0 < fresh.last_prefill_tokens < full // 2
    # Negative control: without the file, the same turn prefills everything.
    with anemll_fast.load(models["a"].path, backend="reference") as cold:
        c = ChatSession(cold, system=SYSTEM, **kw)
        c.messages = list(chat.messages[:-2])
        assert c.send("And then?") == expected
        assert cold.last_prefill_tokens > full // 2


def test_bare_prompt_cache_round_trip(models, model, tmp_path):
    doc = list(range(30, 90))
    question = [5, 6, 7]
    reference = [r.token for r in stream_generate(model, doc + question, max_tokens=6, seed=1)]
    model.engine.reset()
    list(stream_generate(model, doc, max_tokens=0))  # prefill the document only
    assert model.engine.length == len(doc)
    path = tmp_path / "doc.cache"
    save_prompt_cache(path, model, metadata={"source": "doc", "n": 60})
    with anemll_fast.load(models["a"].path, backend="reference") as fresh:
        assert load_prompt_cache(path, fresh, return_metadata=True) == {"source": "doc", "n": "60"}
        assert list(fresh.engine.history) == doc
        got = [r.token for r in stream_generate(fresh, doc + question, max_tokens=6, seed=1)]
        assert got == reference
        assert fresh.last_prefill_tokens == len(question)


@pytest.mark.parametrize("which, culprit", [("other_weights", "another model"),
                                            ("other_context", "context length")])
def test_refuses_another_model(models, model, tmp_path, which, culprit):
    list(stream_generate(model, [1, 2, 3, 4], max_tokens=2))
    path = tmp_path / "x.npz"
    save_prompt_cache(path, model)
    with anemll_fast.load(models[which].path, backend="reference") as other:
        list(stream_generate(other, [9, 9, 9], max_tokens=1))
        before = list(other.engine.history)
        with pytest.raises(PromptCacheError, match=culprit):
            load_prompt_cache(path, other)
        assert list(other.engine.history) == before  # refused before anything was touched


def test_bad_files_are_clear_errors(model, tmp_path):
    list(stream_generate(model, [1, 2, 3, 4], max_tokens=2))
    good = tmp_path / "good.npz"
    save_prompt_cache(good, model)
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    raw = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    for name, culprit in (("missing.npz", "no such file"), ("text.npz", "not a readable"),
                          ("plain.npz", "not an anemll_fast prompt cache"), ("cut.npz", "not a readable")):
        with pytest.raises(PromptCacheError, match=culprit):
            load_prompt_cache(tmp_path / name, model)
    # A state of the wrong shape (hand-edited file) is refused by the engine, naming the state.
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["state_0"] = arrays["state_0"][:1]
    with open(tmp_path / "shape.npz", "wb") as fh:
        np.savez(fh, **arrays)
    before = list(model.engine.history)
    with pytest.raises(PromptCacheError, match="state"):
        load_prompt_cache(tmp_path / "shape.npz", model)
    assert list(model.engine.history) == before  # refused before the cache was touched
    with pytest.raises(PromptCacheError, match="chat session"):
        ChatSession(model).load(good)
    assert zipfile.is_zipfile(good)


def test_breaking_out_of_stream_keeps_the_turn(model, ascii_bias):
    chat = ChatSession(model, max_tokens=12, logit_bias=ascii_bias)
    pieces = []
    for r in chat.stream("Tell me a story"):
        pieces.append(r.text)
        if len(pieces) == 3:
            break
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[0]["content"] == "Tell me a story"
    assert chat.messages[1]["content"] == "".join(pieces)
    chat.send("Go on")  # the conversation goes on, reusing the cache
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert model.last_prefill_tokens < len(chat.prompt_ids()) // 2


def test_a_failed_turn_still_leaves_nothing(model):
    chat = ChatSession(model, max_tokens=4)
    with pytest.raises(ValueError):
        for _ in chat.stream("x" * 2000):  # does not fit the context
            pass
    assert chat.messages == []


@pytest.fixture(scope="module")
def switching(tmp_path_factory):
    """Functions per context size (16, then 48): one set of KV-cache states per size."""
    return build_tiny_model(tmp_path_factory.mktemp("save_ctx") / "ctx", "qwen3", contexts=[16, 48], batch_size=4)


LONG = [5, 77, 300, 12, 9, 411, 23, 8, 99, 140, 7, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # past 16 positions


@pytest.mark.parametrize("prompt", [LONG[:7], LONG], ids=["active_16", "active_48"])
def test_context_switching_model_saves_the_active_size(switching, tmp_path, prompt):
    path = tmp_path / "c.npz"
    with anemll_fast.load(switching.path, backend="reference") as m:
        out = m.engine.generate(prompt, 3)
        saved_at = m.engine.active_context
        assert saved_at == (16 if len(prompt) + 3 < 16 else 48)
        save_prompt_cache(path, m)
        history = list(m.engine.history)
        expected = m.engine.generate(history + [out[-1]], 14)  # crosses into the 48-position size
    with anemll_fast.load(switching.path, backend="reference") as fresh:
        # Restored into an engine whose other size is active, so the saved size must be made active.
        fresh.engine.generate(LONG[::-1] if saved_at == 16 else LONG[:3], 2)
        assert fresh.engine.active_context != saved_at
        load_prompt_cache(path, fresh)
        assert fresh.engine.active_context == saved_at and list(fresh.engine.history) == history
        before = fresh.engine.counters["prefill"]
        assert fresh.engine.generate(history + [out[-1]], 14) == expected
        assert fresh.engine.counters["prefill"] == before  # continued from the file, nothing prefilled again


def test_context_switching_cache_without_its_active_size_is_refused(switching, tmp_path):
    path = tmp_path / "c.npz"
    with anemll_fast.load(switching.path, backend="reference") as m:
        m.engine.generate(LONG[:5], 2)
        save_prompt_cache(path, m)
        with np.load(path) as z:
            arrays = dict(z)
        header = json.loads(str(arrays["header"]))
        for active, culprit in ((None, "without its active context size"), (32, "not one of the model's context"),
                                ("16", "not a context size"), (4, "do not fit the active context size 4")):
            if active is None:
                header.pop("active_context")
            else:
                header["active_context"] = active
            arrays["header"] = np.array(json.dumps(header))
            np.savez(path, **arrays)
            with pytest.raises(PromptCacheError, match=culprit):
                load_prompt_cache(path, m)
