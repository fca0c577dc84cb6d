"""mlx-lm's spelling of the API, random default seeds, and what tools see of the package."""
import math
import subprocess
import sys

import pytest

import anemll_fast
from anemll_fast import generate, load, make_logits_processors, make_sampler, stream_generate
from anemll_fast.sample_utils import UnsupportedSamplingError
from anemll_fast.sampling import SamplingSettings
from anemll_fast.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("mlx") / "m", arch="qwen3", num_chunks=1,
                            context_length=64, batch_size=8, tied=False, split_lm_head=2, seed=11)


@pytest.fixture(scope="module")
def pair(tiny):
    model, tokenizer = load(tiny.path, backend="reference")  # mlx-lm's first line
    yield model, tokenizer
    model.close()


MESSAGES = [{"role": "user", "content": "Say hi"}]


def test_load_unpacks_and_still_works_as_a_context_manager(tiny, pair):
    model, tokenizer = pair
    assert tokenizer is model.tokenizer
    with load(tiny.path, backend="reference") as m:
        assert m.backend == "reference"


def test_tokenizer_chat_template_and_eos(pair):
    model, tokenizer = pair
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert isinstance(text, str) and "Say hi" in text
    assert text == model.apply_chat_template(MESSAGES)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)  # tokenize=True by default
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    without = tokenizer.apply_chat_template(MESSAGES, tokenize=False)  # add_generation_prompt=False, as HF
    assert text.startswith(without) and len(text) > len(without)
    assert isinstance(tokenizer.eos_token_id, int) and tokenizer.eos_token_id in tokenizer.eos_token_ids


def test_mlx_generate_matches_anemll_generate(pair, capsys):
    model, tokenizer = pair
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ours = generate(model, prompt, max_tokens=8)
    capsys.readouterr()
    text = generate(model, tokenizer, prompt=prompt, max_tokens=8, verbose=True)
    assert text == ours
    out = capsys.readouterr().out
    assert out.startswith("=" * 10) and text in out
    for line in ("Prompt: ", "Generation: ", "Peak memory: ", " GB"):
        assert line in out


def test_mlx_stream_generate_fields(pair):
    model, tokenizer = pair
    responses = list(stream_generate(model, tokenizer, "Hello", max_tokens=5))
    first, last = responses[0], responses[-1]
    assert isinstance(first.token, int) and isinstance(first.text, str)
    assert last.finish_reason in ("stop", "length") and last.prompt_tps > 0
    assert last.generation_tps >= 0 and not last.from_draft
    # peak_memory in GB, as mlx-lm: a Python process with numpy is between 10 MB and 1 TB.
    assert 0.01 < last.peak_memory < 1024


def test_prompt_ids_and_keywords_spellings(pair):
    model, tokenizer = pair
    ids = model.encode("Hello")
    a = generate(model, tokenizer, ids, max_tokens=4)
    assert generate(model, ids, max_tokens=4) == a
    assert generate(model, prompt=ids, max_tokens=4) == a
    assert generate(model, ids, SamplingSettings(max_tokens=4)) == a
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, object(), ids, max_tokens=4)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, max_tokens=4)


def test_bos_not_doubled_when_the_text_starts_with_it(pair):
    model, tokenizer = pair
    if tokenizer.bos_token is None:
        tokenizer.bos_token = "<|endoftext|>"  # any special token; restored below
        restore = True
    else:
        restore = False
    try:
        tokenizer.add_bos_token, saved = True, tokenizer.add_bos_token
        bos = tokenizer.bos_token_id
        assert model.encode("hi")[0] == bos
        ids = model.encode(tokenizer.bos_token + "hi")
        assert ids[0] == bos and ids[1] != bos
    finally:
        tokenizer.add_bos_token = saved
        if restore:
            tokenizer.bos_token = None


def _trace(model, seq, **kw):
    return [r.token for r in stream_generate(model, seq, max_tokens=12, **kw) if r.token is not None]


def test_make_sampler_maps_onto_the_native_chain(pair):
    model, tokenizer = pair
    seq = [5, 6, 7, 8]
    kw = dict(temperature=0.9, top_p=0.8, min_p=0.05, top_k=20, seed=3)
    sampled = _trace(model, seq, sampler=make_sampler(temp=0.9, top_p=0.8, min_p=0.05, top_k=20), seed=3)
    assert sampled == _trace(model, seq, **kw)
    assert make_sampler() == make_sampler(temp=0.0)  # greedy, mlx-lm's default
    assert make_sampler(temp=1.0, top_p=0.0).top_p == 1.0  # mlx-lm: top_p 0 (and 1) is off
    assert make_sampler(temp=1.0, top_p=1.0).top_p == 1.0
    assert make_sampler(temp=1.0, top_k=-1).top_k == 0
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(temp=-1.0)


def test_make_logits_processors_map_onto_the_native_chain(pair):
    model, tokenizer = pair
    seq = [5, 6, 7, 8]
    greedy = _trace(model, seq, seed=0)
    banned = {t: -math.inf for t in set(greedy)}
    procs = make_logits_processors(logit_bias=banned, repetition_penalty=1.3, repetition_context_size=10)
    got = _trace(model, seq, logits_processors=procs, seed=0)
    assert got == _trace(model, seq, logit_bias=banned, repetition_penalty=1.3, penalty_window=10, seed=0)
    assert not set(got) & set(greedy)
    from anemll_fast.sample_utils import settings_from_mlx

    fields = settings_from_mlx(None, procs)
    assert fields["penalty_window"] == 10 and fields["repetition_penalty"] == 1.3 and fields["logit_bias"] == banned
    assert settings_from_mlx(None, make_logits_processors(presence_penalty=0.5, frequency_penalty=0.2,
                                                          presence_context_size=7, frequency_context_size=7)) == \
        {"presence_penalty": 0.5, "frequency_penalty": 0.2, "penalty_window": 7}
    assert make_logits_processors() == []
    with pytest.raises(ValueError, match="repetition_penalty"):
        make_logits_processors(repetition_penalty=-1.0)


@pytest.mark.parametrize("call, culprit", [
    (lambda: make_sampler(temp=1.0, xtc_probability=0.5), "xtc_probability"),
    (lambda: make_sampler(temp=1.0, min_tokens_to_keep=3), "min_tokens_to_keep"),
    (lambda: make_logits_processors(repetition_penalty=1.1, presence_penalty=0.5, presence_context_size=5),
     "one window"),
])
def test_unmappable_samplers_raise(call, culprit):
    with pytest.raises(UnsupportedSamplingError, match=culprit):
        call()


def test_custom_callables_and_clashes_raise(pair):
    model, tokenizer = pair
    with pytest.raises(UnsupportedSamplingError, match="sampler"):
        generate(model, tokenizer, "hi", sampler=lambda logprobs: 0)
    with pytest.raises(UnsupportedSamplingError, match="logits_processors"):
        generate(model, tokenizer, "hi", logits_processors=[lambda tokens, logits: logits])
    with pytest.raises(TypeError, match="temperature"):
        generate(model, tokenizer, "hi", sampler=make_sampler(temp=0.5), temperature=0.7)
    with pytest.raises(UnsupportedSamplingError, match="native"):
        make_sampler(temp=0.5)([0.0])


def test_random_default_seed_reported_and_repeatable(pair):
    model, _ = pair
    seq = [5, 6, 7, 8]
    runs = [list(stream_generate(model, seq, max_tokens=12, temperature=1.5)) for _ in range(4)]
    seeds = [r[-1].seed for r in runs]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 4
    assert all(x.seed == r[-1].seed for r in runs for x in r)
    traces = [[x.token for x in r if x.token is not None] for r in runs]
    assert len({tuple(t) for t in traces}) > 1  # runs differ by default
    again = [x.token for x in stream_generate(model, seq, max_tokens=12, temperature=1.5, seed=seeds[2])
             if x.token is not None]
    assert again == traces[2]  # the reported seed repeats its run
    fixed = list(stream_generate(model, seq, max_tokens=3, temperature=1.5, seed=42))
    assert fixed[-1].seed == 42


def test_public_api_is_visible():
    names = dir(anemll_fast)
    for n in ("load", "generate", "stream_generate", "ChatSession", "SamplingSettings", "make_sampler",
              "make_logits_processors", "save_prompt_cache", "load_prompt_cache"):
        assert n in names and n in anemll_fast.__all__
        assert getattr(anemll_fast, n) is not None
    # Type checkers read the TYPE_CHECKING imports: every lazy name is imported there from its module.
    src = open(anemll_fast.__file__, encoding="utf-8").read()
    block = src[src.index("if _TYPE_CHECKING:"):src.index("def __dir__")]
    for n, mod in anemll_fast._LAZY.items():
        assert n in block and (mod is None or f"anemll_fast.{mod} import" in block), n


def test_sampling_flags_show_help_and_defaults():
    out = subprocess.run([sys.executable, "-m", "anemll_fast", "generate", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    section = out[out.index("\nsampling:"):]
    blocks = {}
    for block in section.split("\n  -")[1:]:
        blocks[block.split()[0].strip(",")] = " ".join(block.split())
    for flag, default in (("-temperature", "0.0"), ("-top-p", "1.0"), ("-top-k", "0"), ("-min-p", "0.0"),
                          ("-repetition-penalty", "1.0"), ("-max-tokens", "256"), ("-seed", "random")):
        assert f"default: {default}" in blocks[flag], (flag, blocks[flag])
