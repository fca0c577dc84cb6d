"""The Python API: load, generate, stream_generate, ChatSession, on a converted
tiny model run by the native engine over the reference backend."""
import math

import pytest

import anemll_fast
from anemll_fast.chat import ChatSession
from anemll_fast.chat_template import TemplateError
from anemll_fast.generate import generate, stream_generate, stream_tokens
from anemll_fast.sampling import SamplingSettings
from anemll_fast.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gen") / "m", arch="qwen3", num_chunks=2,
                            context_length=96, batch_size=8, tied=False, split_lm_head=4, seed=3)


@pytest.fixture(scope="module")
def model(tiny):
    with anemll_fast.load(tiny.path, backend="reference") as m:
        yield m


@pytest.fixture(scope="module")
def ascii_bias(model):
    """Keep generations to printable ASCII (and end-of-turn) so that text is readable."""
    tok = model.tokenizer
    allowed = {tok.encode(chr(c))[0] for c in range(32, 127)} | set(tok.eos_token_ids)
    return {i: -math.inf for i in range(model.config.shapes.vocab_size) if i not in allowed}


def test_load_picks_and_reports_backend(model, tiny):
    assert model.backend == "reference"
    assert anemll_fast.model.available_backends()[-1] == "reference"
    auto = anemll_fast.load(tiny.path)  # auto: reference on Linux
    assert auto.backend in anemll_fast.model.available_backends()
    auto.close()


def test_greedy_generation_matches_numpy_reference(model, tiny):
    prompt = [5, 9, 40, 41, 42, 7, 100, 200, 33, 12, 11]  # longer than one batch of 8
    got = [r.token for r in stream_generate(model, prompt, max_tokens=12) if r.token is not None]
    expected = tiny.reference().greedy(prompt, 12)
    ends = [i for i, t in enumerate(expected) if t in model.tokenizer.eos_token_ids]
    # Generation stops at an end-of-turn token, which is not streamed.
    assert got == (expected[: ends[0]] if ends else expected)
    assert len(got) >= 3


def test_streamed_text_equals_generate_text(model, ascii_bias):
    kw = dict(max_tokens=20, logit_bias=ascii_bias, temperature=0.9, seed=7)
    pieces = list(stream_generate(model, "Hello", **kw))
    assert "".join(r.text for r in pieces) == generate(model, "Hello", **kw)
    last = pieces[-1]
    assert last.token is None and last.finish_reason in ("stop", "length")
    assert last.prompt_tokens == len(model.encode("Hello"))
    assert last.generation_tokens >= 1 and last.ttft > 0 and last.peak_memory > 0
    assert all(r.finish_reason is None for r in pieces[:-1])


@pytest.fixture(scope="module")
def no_eos_bias(model, ascii_bias):
    """Printable ASCII only: generation cannot end early."""
    return {**ascii_bias, **{i: -math.inf for i in model.tokenizer.eos_token_ids}}


def test_seed_reproduces(model, ascii_bias):
    kw = dict(max_tokens=16, logit_bias=ascii_bias, temperature=1.0)
    a = generate(model, "abc", seed=11, **kw)
    assert a == generate(model, "abc", seed=11, **kw)
    assert any(generate(model, "abc", seed=s, **kw) != a for s in (12, 13, 14))


def test_finish_reasons(model, no_eos_bias):
    eos = min(model.tokenizer.eos_token_ids)
    out = list(stream_generate(model, "x", max_tokens=5, logit_bias={eos: 100.0}))
    assert out[-1].finish_reason == "stop" and "".join(r.text for r in out) == ""
    out = list(stream_generate(model, "x", max_tokens=3, logit_bias=no_eos_bias))
    assert out[-1].finish_reason == "length" and out[-1].generation_tokens == 3
    out = list(stream_generate(model, "x" * 80, max_tokens=50, logit_bias=no_eos_bias))
    assert out[-1].finish_reason == "context"
    assert out[-1].prompt_tokens + out[-1].generation_tokens == model.context_length + 1


def test_context_shift_continues(model, no_eos_bias):
    out = list(stream_generate(model, "y" * 80, max_tokens=60, logit_bias=no_eos_bias, context_shift=True))
    assert out[-1].finish_reason == "length"
    assert sum(r.token is not None for r in out) == 60


def test_stop_string_cuts_output(model, no_eos_bias):
    kw = dict(max_tokens=24, logit_bias=no_eos_bias, temperature=1.0, seed=5)
    full = generate(model, "Q:", **kw)
    assert len(full) >= 8
    stop = full[5:8]
    cut = generate(model, "Q:", stop=[stop], **kw)
    assert cut == full[: full.index(stop)]
    assert stop not in cut
    # A bare string is one stop string, not a set of one-character stops.
    assert SamplingSettings(stop="END").stop == ("END",)
    assert generate(model, "Q:", stop=stop, **kw) == cut


def test_logprobs(model):
    out = [r for r in stream_generate(model, [3, 4, 5], max_tokens=4, logprobs=3) if r.token is not None]
    for r in out:
        chosen, top = r.logprobs
        assert chosen <= 0 and len(top) == 3
        assert top[0][0] == r.token  # greedy picks the most likely token
        assert math.isclose(top[0][1], chosen, abs_tol=1e-5)


def test_chat_session_reuses_cache_and_matches_fresh_prefill(tiny, ascii_bias):
    settings = SamplingSettings(max_tokens=6, logit_bias=ascii_bias)
    with anemll_fast.load(tiny.path, backend="reference") as m:
        session = ChatSession(m, system="Be brief.", settings=settings)
        session.send("Hi")
        reply2 = session.send("More")
        assert [x["role"] for x in session.messages] == ["system", "user", "assistant", "user", "assistant"]
        prefilled = m.last_prefill_tokens
        text = m.apply_chat_template(session.messages[:-1])
        history_ids = m.tokenizer.encode(text, add_special_tokens=False)
        assert 0 < prefilled < len(history_ids)  # only what follows the cached prefix
    # The same history prefilled from scratch gives the same reply.
    with anemll_fast.load(tiny.path, backend="reference") as fresh:
        responses = list(stream_tokens(fresh, history_ids, settings))
        assert fresh.last_prefill_tokens == len(history_ids)
        assert "".join(r.text for r in responses) == reply2


def test_chat_session_reset_and_failed_turn(model, ascii_bias):
    session = ChatSession(model, max_tokens=3, logit_bias=ascii_bias)
    session.send("a")
    assert len(session.messages) == 2
    session.reset()
    assert session.messages == []
    with pytest.raises(ValueError, match="context length"):
        session.send("z" * 200)
    assert session.messages == []  # the failed turn left nothing behind


def test_model_chat_uses_template(model, ascii_bias):
    text = model.apply_chat_template([{"role": "user", "content": "hey"}])
    assert text == "<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(model.chat([{"role": "user", "content": "hey"}], max_tokens=3, logit_bias=ascii_bias), str)
    with pytest.raises(TemplateError, match="role"):
        model.chat([{"role": "nobody", "content": "x"}])


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(penalty_window=-2), "penalty_window"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(seed=-1), "seed"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
])
def test_invalid_sampling_values_name_the_field(model, kw, field):
    with pytest.raises(ValueError, match=field):
        generate(model, "x", **kw)


def test_invalid_arguments(model, tiny):
    with pytest.raises(TypeError, match="temprature"):
        generate(model, "x", temprature=1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        generate(model, "x", logit_bias={10**6: 1.0})
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [])
    with pytest.raises(ValueError, match="token id 99999"):
        generate(model, [1, 99999])
    with pytest.raises(ValueError, match="context length"):
        generate(model, list(range(3, 200)))
    with pytest.raises(ValueError, match="backend"):
        anemll_fast.load(tiny.path, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        anemll_fast.load(tiny.path, backend="coreml")  # not on Linux
    with pytest.raises(ValueError, match="compute_units"):
        anemll_fast.load(tiny.path, compute_units="npu")
    with pytest.raises(anemll_fast.HubError, match="nowhere"):
        anemll_fast.load("/nowhere/at/all")


def test_close_releases_and_refuses(tiny):
    m = anemll_fast.load(tiny.path, backend="reference")
    m.close()
    m.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        generate(m, "x")


def test_public_api_as_the_readme_uses_it(model, ascii_bias):
    import anemll_fast.chat  # noqa: F401  (importing submodules must not shadow the functions)
    import anemll_fast.generate  # noqa: F401

    assert callable(anemll_fast.generate) and callable(anemll_fast.stream_generate)
    text = anemll_fast.generate(model, "Once", max_tokens=4, logit_bias=ascii_bias)
    assert isinstance(text, str)
    chat = anemll_fast.ChatSession(model, system="Be brief.", max_tokens=3, logit_bias=ascii_bias)
    assert isinstance(chat.send("Hi!"), str)
    settings = anemll_fast.SamplingSettings(temperature=0.5, seed=2, max_tokens=3)
    assert anemll_fast.generate(model, "a", settings) == anemll_fast.generate(model, "a", settings)
