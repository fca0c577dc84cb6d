"""Reliability (issue 12): ids the tokenizer lacks are never sampled, every
sampler setting yields a valid id, one model is shared safely by generators
and threads, a chat over the context goes on, and bad input is a named error
after which the model still generates the same tokens."""
import io
import math
import sys
import threading

import numpy as np
import pytest

import anemll_fast
from anemll_fast import cli
from anemll_fast.chat import ChatSession
from anemll_fast.convert.tokenizer import write_byte_tokenizer
from anemll_fast.errors import ModelClosedError
from anemll_fast.generate import generate, stream_generate
from anemll_fast.sampling import SamplingSettings
from anemll_fast.testing.tiny import build_tiny_model
from anemll_fast.tokenizer import TokenizerError

from assets import qwen3_tokenizer_dir

VOCAB, TOKENS = 512, 300  # LM head rows, tokenizer entries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model whose LM head has more rows than its tokenizer has tokens (as Qwen3)."""
    t = build_tiny_model(tmp_path_factory.mktemp("rel") / "m", arch="qwen3", num_chunks=2, context_length=48,
                         batch_size=8, tied=False, split_lm_head=4, seed=7, vocab_size=VOCAB)
    write_byte_tokenizer(t.path, TOKENS, context_length=48)
    return t


@pytest.fixture(scope="module")
def model(tiny):
    with anemll_fast.load(tiny.path, backend="reference") as m:
        assert m.tokenizer.vocab_size == TOKENS and m.config.shapes.vocab_size == VOCAB
        yield m


PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def baseline(model):
    """What the model generates for PROMPT before any bad input (compared after each)."""
    return generate_ids(model, PROMPT, max_tokens=8)


def generate_ids(model, prompt, **kw):
    return [r.token for r in stream_generate(model, prompt, **kw) if r.token is not None]


def still_same(model, baseline):
    assert generate_ids(model, PROMPT, max_tokens=8) == baseline


# ------------------------------------------------------------ vocabulary mask
def test_tail_past_the_tokenizer_is_never_sampled(model, baseline):
    assert model.engine.valid_vocab == TOKENS  # set natively, once, at load
    out = generate_ids(model, PROMPT, max_tokens=40, temperature=50.0, seed=1)  # near uniform over the ids
    assert len(out) == 40 and max(out) < TOKENS
    # Without the mask, about 41% of such draws land in the tail (the control).
    full = anemll_fast.Engine(model.config, "reference")
    try:
        full.set_sampling(SamplingSettings(temperature=50.0, seed=1))
        assert max(full.generate(PROMPT, 40)) >= TOKENS
    finally:
        full.close()
    for kw in (dict(), dict(temperature=1.0, top_k=600), dict(temperature=1.0, top_k=5), dict(temperature=2.0, top_p=0.99),
               dict(temperature=2.0, min_p=0.01), dict(logprobs=3)):
        for r in stream_generate(model, PROMPT, max_tokens=6, **kw):
            if r.token is not None:
                assert r.token < TOKENS, kw
                if r.logprobs:
                    assert all(i < TOKENS for i, _ in r.logprobs[1])
    # Greedy picks the best id the tokenizer has.
    model.engine.set_sampling(SamplingSettings())
    model.engine.reset()
    first = model.engine.generate(PROMPT, 1)[0]
    logits = model.engine.logits().astype(np.float32)
    assert first == int(np.argmax(logits[:TOKENS]))
    still_same(model, baseline)


def test_mask_holds_with_logits_in_padded_backend_buffers(model):
    """Logits the backend keeps in its own (padded, mapped per step) buffers are masked alike."""
    from anemll_fast import _native
    from anemll_fast.backends import reference

    sampling = SamplingSettings(temperature=50.0, seed=1)
    plain = anemll_fast.Engine(model.config, "reference", valid_vocab=TOKENS, sampling=sampling)
    backend = _native.CallbackBackend(reference, buffer_row_pad=8)
    padded = anemll_fast.Engine(model.config, backend, valid_vocab=TOKENS, sampling=sampling)
    try:
        out = padded.generate(PROMPT, 30)
        assert max(out) < TOKENS and out == plain.generate(PROMPT, 30)
        assert backend.buffer_stats()["maps"] >= 30  # the sampler read mapped backend memory
    finally:
        plain.close()
        padded.close()


@pytest.mark.parametrize("bad", [[TOKENS], [1, VOCAB - 1], [-1]])
def test_prompt_ids_past_the_tokenizer_are_refused(model, baseline, bad):
    with pytest.raises(ValueError, match=f"token id {bad[-1]}"):
        generate(model, bad, max_tokens=3)
    with pytest.raises(ValueError, match=f"token id {bad[-1]}"):
        model.engine.generate(bad, 1)  # the engine refuses them too
    with pytest.raises(ValueError, match="logit_bias"):
        generate(model, PROMPT, logit_bias={TOKENS: 1.0})
    still_same(model, baseline)


class _TailArgmax:
    """The reference backend, with an in-model argmax whose last part always
    reports its last id (past the tokenizer) as the best of all."""

    def __init__(self):
        from anemll_fast.backends import reference

        self.ref = reference

    def load(self, path, function_name=None):
        model = self.ref.load(path, function_name)
        if "lm_head" not in path:
            return model
        predict = model.predict

        def rigged(inputs, state=None):
            out = dict(predict(inputs, state))
            idx, val = np.array(out["argmax_idx"]), np.array(out["argmax_val"])
            idx.reshape(-1)[-1] = VOCAB // idx.size - 1  # the last id of the last part
            val.reshape(-1)[-1] = 100.0
            out["argmax_idx"], out["argmax_val"] = idx, val
            return out

        model.predict = rigged
        return model


def test_engine_valid_vocab_argument(model):
    with pytest.raises(anemll_fast.ConfigError, match=f"tokenizer: it has {VOCAB + 1} tokens but the model's "
                                                      f"vocab_size is only {VOCAB}"):
        anemll_fast.Engine(model.config, "reference", valid_vocab=VOCAB + 1)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="valid_vocab"):
            anemll_fast.Engine(model.config, "reference", valid_vocab=bad)


def test_argmax_head_never_returns_an_id_past_the_tokenizer(tmp_path, monkeypatch):
    t = build_tiny_model(tmp_path / "a", arch="llama", context_length=16, batch_size=4, split_lm_head=2,
                         argmax_head=True, vocab_size=VOCAB, seed=2, num_layers=1)
    write_byte_tokenizer(t.path, TOKENS, context_length=16)
    import anemll_fast.model as model_mod

    monkeypatch.setattr(model_mod, "_backend_object", lambda name, cu: _TailArgmax())
    with anemll_fast.load(t.path, backend="reference") as m:
        out = generate_ids(m, [3, 4], max_tokens=6)
        assert len(out) == 6 and max(out) < TOKENS
        # The rigged part is dropped, the other part's argmax is taken (ids < 256 here).
        assert max(out) < VOCAB // 2


class _TailBoost:
    """The reference backend, with the LM head's logits past `start` raised so that
    without a mask they would always win."""

    def __init__(self, start):
        from anemll_fast.backends import reference

        self.start, self.ref = start, reference

    def load(self, path, function_name=None):
        model = self.ref.load(path, function_name)
        if "lm_head" not in path:
            return model
        start, predict = self.start, model.predict

        def boosted(inputs, state=None):
            out = dict(predict(inputs, state))
            offset = 0
            for name in sorted((k for k in out if k.startswith("logits")), key=lambda k: int(k[6:])):
                arr = np.array(out[name])
                flat = arr.reshape(-1)
                lo = max(start - offset, 0)
                if lo < flat.size:
                    flat[lo:] = 30.0
                out[name] = arr
                offset += flat.size
            return out

        model.predict = boosted
        return model


@pytest.mark.slow
def test_qwen3_vocabulary_with_the_real_tokenizer(tmp_path, monkeypatch):
    """The issue's reproducer: 151,936 logits, 151,669 tokenizer entries."""
    tok_dir = qwen3_tokenizer_dir()
    t = build_tiny_model(tmp_path / "q", arch="qwen3", vocab_size=151936, hidden_size=16, num_heads=2,
                         num_kv_heads=1, intermediate_size=32, num_layers=1, context_length=16, batch_size=4,
                         split_lm_head=16)
    import anemll_fast.model as model_mod

    real = model_mod._backend_object
    monkeypatch.setattr(model_mod, "_backend_object",
                        lambda name, cu: _TailBoost(151669) if name == "reference" else real(name, cu))
    with anemll_fast.load(t.path, backend="reference", tokenizer=tok_dir) as m:
        assert m.tokenizer.vocab_size == 151669
        with pytest.raises(ValueError, match="token id 151935"):
            generate(m, [151935], max_tokens=3)
        for kw in (dict(), dict(temperature=1.0, seed=3), dict(temperature=1.0, top_k=50)):
            out = generate_ids(m, [151668, 42], max_tokens=5, **kw)
            assert len(out) == 5 and max(out) < 151669, (kw, out)
        assert int(np.argmax(m.engine.logits())) >= 151669  # the boost is real: unmasked, the tail wins
        assert isinstance(generate(m, [151668, 42], max_tokens=3), str)  # decodes


# ------------------------------------------------------------------- min_p
@pytest.mark.parametrize("kw", [dict(), dict(top_k=20), dict(top_p=0.9), dict(top_k=300)])
def test_min_p_one_keeps_the_top_token(model, baseline, kw):
    out = generate_ids(model, PROMPT, max_tokens=8, temperature=0.8, min_p=1.0, **kw)
    assert out == baseline  # only the best token survives: greedy


def test_native_sampler_min_p_one_never_returns_minus_one():
    from anemll_fast import _native

    rng = np.random.default_rng(0)
    for trial in range(50):
        logits = (rng.standard_normal(1000) * rng.uniform(0.1, 30)).astype(np.float16)
        for extra in (dict(), dict(top_k=7), dict(top_p=0.5), dict(top_k=900)):
            s = _native.NativeSampler(1000, dict(temperature=float(rng.uniform(0.05, 5)), min_p=1.0, seed=trial,
                                                 **extra))
            best = set(np.flatnonzero(logits == logits.max()).tolist())  # fp16 ties all have p = p_max
            assert s.sample([logits.copy()]) in best, extra


# ---------------------------------------------------------- sampling ranges
@pytest.mark.parametrize("kw, field, allowed", [
    (dict(top_k=2**31), "top_k", "2**31-1"),
    (dict(penalty_window=10**12), "penalty_window", "2**31-1"),
    (dict(temperature=1e308), "temperature", "[0, 10000]"),
    (dict(temperature=10**400), "temperature", "finite"),
    (dict(repetition_penalty=1e-300), "repetition_penalty", "[0.0001, 10000]"),
    (dict(frequency_penalty=-1e39), "frequency_penalty", "[-10000, 10000]"),
    (dict(presence_penalty=1e39), "presence_penalty", "[-10000, 10000]"),
    (dict(logit_bias={1: 1e300}), "logit_bias", "10000"),
    (dict(logit_bias={2**40: 1.0}), "logit_bias", "non-negative integer"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(min_p=-0.1), "min_p", "[0, 1]"),
    (dict(temperature="1"), "temperature", "number"),
    (dict(top_k=1.5), "top_k", "integer"),
])
def test_sampling_ranges_name_the_field_and_range(model, baseline, kw, field, allowed):
    with pytest.raises(ValueError, match=field) as info:
        generate(model, PROMPT, **kw)
    assert allowed in str(info.value)
    still_same(model, baseline)


def test_tiny_top_p_acts_as_greedy(model, baseline):
    # 1e-300 is below float32: it keeps the best token, as any tiny nucleus does.
    assert generate_ids(model, PROMPT, max_tokens=8, temperature=1.0, top_p=1e-300) == baseline


def test_cli_prints_range_errors_without_traceback(tiny, capsys):
    rc = cli.main(["generate", "--model", str(tiny.path), "--backend", "reference", "--prompt-ids", "5,6",
                   "--top-k", str(2**31)])
    err = capsys.readouterr().err
    assert rc == 2 and "top_k" in err and "Traceback" not in err


# ---------------------------------------------------------------- token ids
@pytest.mark.parametrize("prompt, culprit", [
    ([1.5], "1.5"), (["1"], "'1'"), ([True], "True"), (b"\xff\xfe", "bytes"), (bytearray(b"\x01"), "bytearray"),
    ([5, None], "None"), (np.array([[1, 2]]), "shape"), (np.array([1.0, 2.0]), "1.0"), (12, "int"),
])
def test_token_ids_must_be_integers(model, baseline, prompt, culprit):
    with pytest.raises(ValueError, match="prompt") as info:
        generate(model, prompt, max_tokens=2)
    assert culprit in str(info.value)
    still_same(model, baseline)


def test_numpy_integer_ids_are_accepted(model, baseline):
    assert generate_ids(model, np.array(PROMPT, dtype=np.int64), max_tokens=8) == baseline


@pytest.mark.parametrize("args, culprit", [
    (["--prompt-ids", "1,,2"], "field 2 is an empty field"),
    (["--prompt-ids", "1,2,"], "field 3"),
    (["--prompt-ids", "1.5"], "'1.5'"),
    (["--prompt-ids", "١,2"], "'١'"),  # a non-ASCII digit int() would take
    (["--prompt-ids", "5,6", "--prompt", "hello"], "not both"),
    (["--prompt-ids", "5,6", "--system", "be nice"], "not both"),
    (["--prompt-ids", f"5,{TOKENS}"], f"token id {TOKENS}"),
])
def test_cli_prompt_ids_refused(tiny, capsys, args, culprit):
    rc = cli.main(["generate", "--model", str(tiny.path), "--backend", "reference", *args])
    err = capsys.readouterr().err
    assert rc == 2 and culprit in err, err


# ------------------------------------------------------------- Unicode text
def test_lone_surrogate_prompt_is_refused(model, baseline):
    with pytest.raises(TokenizerError, match="U\\+DCFF"):
        generate(model, "abc\udcffdef", max_tokens=2)
    session = ChatSession(model, max_tokens=2)
    with pytest.raises(ValueError, match="messages\\[0\\].content: character 3 is a lone surrogate U\\+D800"):
        session.send("hi \ud800")
    assert session.messages == []  # the session goes on
    assert isinstance(session.send("hi"), str) and len(session.messages) == 2
    with pytest.raises(TokenizerError, match="system: character 2 is a lone surrogate"):
        ChatSession(model, system="ok\udc80")
    with pytest.raises(ValueError, match="stop"):
        generate(model, PROMPT, stop=["\ud800"])
    still_same(model, baseline)


def test_cli_non_utf8_argument_is_refused(tiny, capsys):
    text = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python receives such argv bytes
    rc = cli.main(["generate", "--model", str(tiny.path), "--backend", "reference", "--prompt", text,
                   "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt: character 3 is a lone surrogate" in err and "UTF-8" in err


def test_chat_survives_non_utf8_stdin(tiny, capsys, monkeypatch):
    data = "hello\n".encode() + b"\xff\xfe bad\n" + "again\n/exit\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    rc = cli.main(["chat", "--model", str(tiny.path), "--backend", "reference", "--max-tokens", "2",
                   "--context-shift"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "not valid UTF-8 (byte 0xff at offset 0)" in err
    assert err.count("decode:") == 2  # both good turns answered


# ----------------------------------------------------- generators and threads
def test_suspended_generator_resumes_with_its_own_tokens(model, baseline):
    for kw in (dict(), dict(temperature=0.9, seed=11), dict(temperature=0.9, seed=11, repetition_penalty=1.3)):
        alone = generate_ids(model, PROMPT, max_tokens=10, **kw)
        other = generate_ids(model, [20, 21, 22], max_tokens=10, temperature=1.0, seed=4)
        a = stream_generate(model, PROMPT, max_tokens=10, **kw)
        got = [next(a).token for _ in range(4)]
        # Another generation on the same model, with another sampler and KV cache content.
        assert generate_ids(model, [20, 21, 22], max_tokens=10, temperature=1.0, seed=4) == other
        b = stream_generate(model, [30, 31], max_tokens=10)
        next(b)
        got += [r.token for r in a if r.token is not None]
        assert got == alone, kw
        b.close()
    still_same(model, baseline)


def test_interleaved_generators_each_yield_their_own_tokens(model, baseline):
    kws = [dict(prompt=PROMPT, max_tokens=9), dict(prompt=[40, 41, 42, 43], max_tokens=9, temperature=1.2, seed=2),
           dict(prompt=PROMPT[:3], max_tokens=9, temperature=0.7, top_k=5, seed=9)]
    alone = [generate_ids(model, kw["prompt"], **{k: v for k, v in kw.items() if k != "prompt"}) for kw in kws]
    gens = [stream_generate(model, kw["prompt"], **{k: v for k, v in kw.items() if k != "prompt"}) for kw in kws]
    got = [[] for _ in kws]
    live = set(range(len(gens)))
    while live:
        for i in sorted(live):
            r = next(gens[i])
            if r.token is None:
                live.discard(i)
            else:
                got[i].append(r.token)
    assert got == alone
    still_same(model, baseline)


def test_close_while_a_stream_is_suspended(tiny):
    m = anemll_fast.load(tiny.path, backend="reference")
    expected = generate_ids(m, PROMPT, max_tokens=6)
    a = stream_generate(m, PROMPT, max_tokens=6)
    b = stream_generate(m, PROMPT, max_tokens=6)
    assert next(a).token == expected[0] and next(b).token == expected[0]
    b.close()  # closing a suspended generator leaves the model usable
    assert generate_ids(m, PROMPT, max_tokens=6) == expected
    m.close()
    with pytest.raises(ModelClosedError, match="closed"):
        next(a)
    with pytest.raises(ModelClosedError, match="closed"):
        generate(m, PROMPT)
    a.close()


def test_one_model_shared_by_four_threads(model, baseline):
    requests = [
        (PROMPT, dict(max_tokens=10)),
        ([40, 41, 42], dict(max_tokens=10, temperature=1.0, seed=5)),
        ([7, 8], dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=6, repetition_penalty=1.2)),
        ([50, 51, 52, 53, 54], dict(max_tokens=10, temperature=1.5, top_k=8, seed=7)),
    ]
    alone = [generate(model, p, **kw) for p, kw in requests]
    alone_ids = [generate_ids(model, p, **kw) for p, kw in requests]
    results = [[] for _ in requests]
    errors = []
    start = threading.Barrier(len(requests))

    def worker(i):
        p, kw = requests[i]
        try:
            start.wait(timeout=30)
            for rep in range(3):
                if rep == 1:  # a streamed generation too: it interleaves step by step
                    results[i].append(generate_ids(model, p, **kw))
                else:
                    results[i].append(generate(model, p, **kw))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i in range(len(requests)):
        assert results[i] == [alone[i], alone_ids[i], alone[i]]
    still_same(model, baseline)


# -------------------------------------------------------- chat over context
def test_chat_with_context_shift_drops_oldest_turns(model, baseline):
    session = ChatSession(model, system="S", context_shift=True, max_tokens=4,
                          logit_bias={t: -math.inf for t in model.tokenizer.eos_token_ids})
    everything = []
    for turn in range(12):
        reply = session.send(f"turn {turn} words")
        everything += [{"role": "user", "content": f"turn {turn} words"}, {"role": "assistant", "content": reply}]
        assert session.messages[0] == {"role": "system", "content": "S"}
        # The most recent turns are kept, in order; the oldest were dropped.
        kept = session.messages[1:]
        assert kept == everything[-len(kept):] and len(kept) % 2 == 0
    assert len(session.messages) < 2 * 12 + 1
    with pytest.raises(ValueError, match="message alone"):
        session.send("x" * 100)
    assert session.messages[-1]["role"] == "assistant"  # the refused turn left nothing, the rest is kept
    still_same(model, baseline)


def test_chat_without_context_shift_says_how_to_recover(model, baseline):
    session = ChatSession(model, max_tokens=4, logit_bias={t: -math.inf for t in model.tokenizer.eos_token_ids})
    with pytest.raises(ValueError, match="reset\\(\\)") as info:
        for turn in range(12):
            session.send(f"turn {turn} words")
    assert "context_shift=True" in str(info.value)
    kept = list(session.messages)
    session.reset()
    assert session.messages == [] and kept
    session.send("ok")
    still_same(model, baseline)


# ------------------------------------------------------------ chat templates
@pytest.mark.parametrize("template, why", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "more than"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ("{% for m in messages recursive %}{{ loop([m]) }}{% endfor %}", "recursion"),
    ("{{ 'x' * 10**9 }}", "1,000,000,000"),
    ("{{ 10**9 * ['x'] }}", "list"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "str of"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "str of"),
    ("{{ 'a'.ljust(10**9) }}", "argument"),
    ("{{ '%2000000000d' % 1 }}", "format width"),
    ("{{ '{:>2000000000}'.format(1) }}", "format width"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "output"),
])
def test_runaway_templates_are_bounded_and_named(model, baseline, monkeypatch, template, why):
    import anemll_fast.chat_template as ct

    monkeypatch.setattr(ct, "RENDER_TIMEOUT", 0.5)
    monkeypatch.setattr(model.tokenizer, "chat_template", template)
    with pytest.raises(ct.TemplateError, match=why) as info:
        model.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "tokenizer_config.json" in str(info.value)  # names the template's file
    monkeypatch.undo()
    assert model.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")
    still_same(model, baseline)


def test_ordinary_template_features_still_render():
    from anemll_fast.chat_template import render

    t = ("{% for m in messages %}{{ '%-5s|' % m.role }}{{ '{:>3}'.format(loop.index) }}{{ 'ab' * 2 }}"
         "{{ m.content + '!' }}{{ m.content ~ '?' }}{% endfor %}{{ range(3)|list|length }}")
    assert render(t, [{"role": "user", "content": "hi"}]) == "user |  1ababhi!hi?3"


# ------------------------------------------------------------- model files
def test_non_utf8_meta_yaml_is_named(tiny, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny.path, copy)
    meta = copy / "meta.yaml"
    meta.write_bytes(meta.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(anemll_fast.ConfigError, match="meta.yaml: not UTF-8 text \\(byte 0xe9"):
        anemll_fast.load(copy, backend="reference")
    (copy / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    meta.write_bytes((tiny.path / "meta.yaml").read_bytes())
    with pytest.raises(TokenizerError, match="chat_template.jinja: not UTF-8"):
        anemll_fast.load(copy, backend="reference")


def test_mil_dimension_past_64_bits_is_named(tmp_path):
    from anemll_fast.mil.errors import MilFormatError
    from anemll_fast.mil.text_parser import parse_mil_text

    text = ("program(1.3)\n[buildInfo = dict<string, string>({})]\n{\n"
            "    func main<ios18>(tensor<fp16, [1, 9223372036854775808]> x) {\n"
            "        tensor<fp16, [1, 4]> y = identity(x = x)[name = string(\"y\")];\n"
            "    } -> (y);\n}\n")
    with pytest.raises(MilFormatError, match="bad.mil: line 4.*9223372036854775808 does not fit 64 bits"):
        parse_mil_text(text, source="bad.mil")
    ok = parse_mil_text(text.replace("9223372036854775808", "4"), source="ok.mil")
    assert ok is not None


# -------------------------------------------------------------- zip parts
def _zip(path, files):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_unzipped_part_gets_the_umask_mode(tmp_path):
    import os
    import stat

    from anemll_fast import hub

    archive = _zip(tmp_path / "a.mlmodelc.zip", {"a.mlmodelc/model.mil": "x", "a.mlmodelc/w/weight.bin": "y"})
    old = os.umask(0o022)
    try:
        target = hub.safe_unzip(archive, tmp_path / "a.mlmodelc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((target / "w").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "model.mil").stat().st_mode) == 0o644


@pytest.mark.parametrize("files, why", [({}, "is empty"), ({"e.mlmodelc/readme.txt": "x"}, "no model.mil")])
def test_empty_or_partial_zip_is_not_a_complete_unpack(tmp_path, files, why):
    from anemll_fast import hub
    from anemll_fast.errors import HubError

    archive = _zip(tmp_path / "e.mlmodelc.zip", files)
    with pytest.raises(HubError, match=why) as info:
        hub.safe_unzip(archive, tmp_path / "e.mlmodelc")
    assert "e.mlmodelc.zip" in str(info.value)
    assert not (tmp_path / "e.mlmodelc").exists()


def test_replaced_archive_is_unpacked_again(tmp_path):
    import os

    from anemll_fast import hub

    archive = _zip(tmp_path / "r.mlmodelc.zip", {"r.mlmodelc/model.mil": "old"})
    target = hub.safe_unzip(archive, tmp_path / "r.mlmodelc")
    assert (target / "model.mil").read_text() == "old"
    assert hub.safe_unzip(archive, target) == target  # unchanged: kept
    _zip(archive, {"r.mlmodelc/model.mil": "new!"})
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hub.safe_unzip(archive, target)
    assert (target / "model.mil").read_text() == "new!"
    assert hub.is_unpacked(target, archive)
    assert not list(tmp_path.glob(".r.mlmodelc.*"))  # no partial or stale directory left


# ------------------------------------------------------ chunks and meta.yaml
def _copy_model(tiny, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(tiny.path, dst)
    return dst


def _edit_metadata(package, **changes):
    """Set (or with None, drop) user-defined metadata of an .mlpackage part."""
    from coremltools.proto import Model_pb2

    spec_path = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    for key, value in changes.items():
        if value is None:
            spec.description.metadata.userDefined.pop(f"com.anemll.{key}", None)
        else:
            spec.description.metadata.userDefined[f"com.anemll.{key}"] = str(value)
    spec_path.write_bytes(spec.SerializeToString())


CHUNK1, CHUNK2 = "qwen_FFN_PF_chunk_01of02.mlpackage", "qwen_FFN_PF_chunk_02of02.mlpackage"


def test_chunk_replaced_by_a_copy_of_another_is_refused(tiny, tmp_path, model, baseline):
    import shutil

    d = _copy_model(tiny, tmp_path)
    shutil.rmtree(d / CHUNK2)
    shutil.copytree(d / CHUNK1, d / CHUNK2)  # the reproducer
    with pytest.raises(anemll_fast.ConfigError, match=f"{CHUNK2}: its metadata \\(com.anemll.chunk_no\\) says "
                                                      "it is chunk 1, but it is loaded as chunk 2 of 2"):
        anemll_fast.load(d, backend="reference")
    # Without ANEMLL's chunk metadata, the copy is still told by its content.
    _edit_metadata(d / CHUNK2, chunk_no=None, first_layer=None, num_layers=None)
    with pytest.raises(anemll_fast.ConfigError, match=f"{CHUNK2}: has the very weights of {CHUNK1}"):
        anemll_fast.load(d, backend="reference")
    still_same(model, baseline)


@pytest.mark.parametrize("changes, why", [
    (dict(first_layer=0), "starts at layer 0, expected 1: its range overlaps"),
    (dict(first_layer=2), "starts at layer 2, expected 1: its range leaves out layers"),
    (dict(num_chunks=3), "says 3 chunks"),
    (dict(chunk_no=7), "says it is chunk 7"),
])
def test_chunk_layer_ranges_from_metadata(tiny, tmp_path, changes, why):
    d = _copy_model(tiny, tmp_path)
    _edit_metadata(d / CHUNK2, **changes)
    with pytest.raises(anemll_fast.ConfigError, match=why) as info:
        anemll_fast.load(d, backend="reference")
    assert CHUNK2 in str(info.value)


@pytest.mark.parametrize("field, value, actual", [
    ("context_length", 64, 48), ("batch_size", 4, 8), ("vocab_size", 600, VOCAB), ("split_lm_head", 2, 4),
    ("lm_head_chunk_sizes", [256, 256], [128, 128, 128, 128]),
])
def test_meta_yaml_contradicting_the_files_is_named(tiny, tmp_path, model, baseline, field, value, actual):
    import yaml

    d = _copy_model(tiny, tmp_path)
    meta = yaml.safe_load((d / "meta.yaml").read_text())
    meta["model_info"]["parameters"][field] = value
    (d / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(anemll_fast.ConfigError) as info:
        anemll_fast.load(d, backend="reference")
    msg = str(info.value)
    assert f"parameters.{field} is {value}" in msg and str(actual) in msg and str(d / "meta.yaml") in msg
    still_same(model, baseline)


def test_part_metadata_contradicting_meta_yaml_is_a_warning(tiny, tmp_path, caplog):
    d = _copy_model(tiny, tmp_path)
    _edit_metadata(d / CHUNK1, context_length=4096)
    with caplog.at_level("WARNING", logger="anemll_fast"):
        with anemll_fast.load(d, backend="reference") as m:
            assert generate_ids(m, PROMPT, max_tokens=2)
    assert any("com.anemll.context_length is 4096" in r.getMessage() and CHUNK1 in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------- soak
def _rss_bytes():
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_soak_5000_decode_steps_with_context_shift_keep_rss_flat(tmp_path):
    import os

    # As small as a model gets, so that 5,000 steps (a context shift every ~16) take seconds.
    t = build_tiny_model(tmp_path / "soak", arch="llama", context_length=32, batch_size=4, hidden_size=16,
                         num_heads=2, num_kv_heads=1, intermediate_size=32, num_layers=1, vocab_size=260,
                         split_lm_head=1)
    with anemll_fast.load(t.path, backend="reference") as m:
        no_end = {i: -math.inf for i in m.tokenizer.eos_token_ids}
        stream = stream_generate(m, [5, 6, 7], max_tokens=5000, context_shift=True, logit_bias=no_end,
                                 temperature=1.0, seed=1, repetition_penalty=1.1)
        steps, warm_rss, warm_fds = 0, None, None
        for r in stream:
            if r.token is None:
                break
            steps += 1
            if steps == 500:  # after warm-up: every buffer, cache and interned object exists
                warm_rss, warm_fds = _rss_bytes(), len(os.listdir("/proc/self/fd"))
        assert steps == 5000 and r.finish_reason == "length"
        growth = _rss_bytes() - warm_rss
        assert growth < 5 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB over 4,500 decode steps"
        assert len(os.listdir("/proc/self/fd")) <= warm_fds


def test_no_sampler_setting_yields_an_invalid_id():
    """Random settings (extremes included) over random logits with -inf and NaN entries:
    always an id of the vocabulary, or a named error when nothing is left to sample."""
    from anemll_fast import _native

    rng = np.random.default_rng(12)
    for trial in range(300):
        v = int(rng.integers(2, 300))
        logits = (rng.standard_normal(v) * rng.choice([0.01, 1, 30, 1000])).astype(np.float16)
        logits[rng.random(v) < rng.choice([0, 0.5, 0.99])] = -np.inf
        logits[rng.random(v) < 0.05] = np.nan
        settings = SamplingSettings(
            temperature=float(rng.choice([0, 1e-30, 0.1, 1, 100, 10000])),
            top_k=int(rng.choice([0, 1, 2, 40, 10**6])), top_p=float(rng.choice([1e-300, 0.01, 0.5, 1.0])),
            min_p=float(rng.choice([0, 1e-300, 0.5, 1.0])),
            repetition_penalty=float(rng.choice([1e-4, 1, 1.3, 1e4])),
            presence_penalty=float(rng.choice([-1e4, 0, 2])), frequency_penalty=float(rng.choice([0, 1e4])),
            penalty_window=int(rng.choice([0, 3, 64])), seed=trial,
            logit_bias={int(rng.integers(0, v)): float(rng.choice([-np.inf, -1e4, 5, 1e4]))})
        s = _native.NativeSampler(v, settings.to_native())
        history = rng.integers(0, v, 8)
        alive = np.isfinite(logits.astype(np.float32))
        for tok, bias in settings.logit_bias.items():
            alive[tok] &= bias > -np.inf
        finite = alive.any()
        try:
            token = s.sample([logits.copy()], history)
        except ValueError as exc:
            assert not finite, (trial, settings, exc)
            assert "no token left" in str(exc)
            continue
        assert 0 <= token < v, (trial, settings, token)
