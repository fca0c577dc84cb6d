"""`anemll-fast generate` and `chat` end to end, in subprocesses."""
import json
import subprocess
import sys

import pytest

from anemll_fast.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("cli") / "m", arch="llama", context_length=64,
                            batch_size=8, tied=False, split_lm_head=2, seed=1)


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "anemll_fast", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def _greedy_until_eos(tiny, prompt, n):
    """The reference's greedy tokens as the CLI reports them: an end-of-sequence token ends, unprinted."""
    eos = {0, 2}  # the tiny byte-level tokenizer's <|endoftext|>, <|im_end|>
    out = tiny.reference().greedy(prompt, n, stop=sorted(eos))
    return (out[:-1], "stop") if out and out[-1] in eos else (out, "length")


def test_generate_json_with_prompt_ids_matches_reference(tiny):
    res = run("generate", "--model", str(tiny.path), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "6",
              "--backend", "reference", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"text", "tokens", "prompt_tokens", "prefill_tps", "decode_tps", "ttft_ms", "finish_reason"}
    assert out["prompt_tokens"] == 5
    tokens, finish = _greedy_until_eos(tiny, [5, 6, 7, 8, 9], 6)
    assert len(tokens) == 6  # the whole budget: a CLI stopping early cannot pass
    assert (out["tokens"], out["finish_reason"]) == (tokens, finish)


def _sampled(tiny, seed, temperature="0.7"):
    res = run("generate", "--model", str(tiny.path), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "8",
              "--temperature", temperature, "--seed", str(seed), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["tokens"]


def test_generate_streams_text_and_prints_speeds(tiny):
    res = run("generate", "--model", str(tiny.path), "--prompt", "hello", "--max-tokens", "4",
              "--temperature", "0.7", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "[backend: reference]" in res.stderr
    assert "prefill:" in res.stderr and "decode:" in res.stderr and "ttft:" in res.stderr


@pytest.mark.slow
def test_generate_seed_reproduces_and_differs_between_seeds(tiny):
    a = _sampled(tiny, 3)
    assert len(a) == 8 and _sampled(tiny, 3) == a  # a seed reproduces
    # ...and is used at all: other seeds give other tokens, and none is the greedy answer (temperature honoured).
    others = [_sampled(tiny, s) for s in (4, 5)]
    assert all(o != a for o in others), (a, others)
    greedy, _ = _greedy_until_eos(tiny, [5, 6, 7, 8, 9], 8)
    assert greedy not in [a] + others


@pytest.mark.slow
def test_chat_py_compatible_flags(tiny, tmp_path):
    import shutil

    res = run("generate", "--meta", str(tiny.path / "meta.yaml"), "--prompt", "hi", "--no-template",
              "--max-tokens", "2", "--context-length", "64", "--batch-size", "8", "--json")
    assert res.returncode == 0, res.stderr
    # Each flag is honoured, not just accepted: a model directory where meta.yaml's FFN name and the tokenizer
    # are missing runs only when --ffn and --tokenizer point at them.
    d, tok = tmp_path / "m", tmp_path / "tok"
    shutil.copytree(tiny.path, d)
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.move(str(d / name), str(tok / name))
    (d / "llama_FFN_PF_chunk_01of01.mlpackage").rename(d / "other_FFN_PF_chunk_01of01.mlpackage")
    args = ["generate", "--d", str(d), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "4", "--json"]
    res = run(*args, "--tokenizer", str(tok), "--ffn", "other_FFN_PF_chunk_01of01.mlmodelc")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == _greedy_until_eos(tiny, [5, 6, 7, 8, 9], 4)[0]
    res = run(*args, "--tokenizer", str(tok))
    assert res.returncode != 0 and "llama_FFN_PF_chunk_01of01" in res.stderr
    res = run(*args, "--ffn", "other_FFN_PF_chunk_01of01.mlmodelc")
    assert res.returncode != 0 and "tokenizer" in res.stderr.lower()
    for flag, value in (("--context-length", "512"), ("--context-length", "32"), ("--batch-size", "4")):
        res = run("generate", "--d", str(tiny.path), "--prompt", "hi", flag, value)
        assert res.returncode == 2 and f"{flag} {value}" in res.stderr and "Traceback" not in res.stderr


def test_chat_through_stdin(tiny):
    res = run("chat", "--model", str(tiny.path), "--max-tokens", "3", stdin="hello\n/reset\nagain\n/exit\nignored\n")
    assert res.returncode == 0, res.stderr
    assert "[conversation cleared]" in res.stderr
    assert res.stderr.count("decode:") == 2  # two turns answered, nothing after /exit


@pytest.mark.parametrize("args, culprit", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--prompt-ids", "1,999999"], "999999"),
    (["--backend", "coreml"], "backend"),
])
def test_generate_bad_arguments(tiny, args, culprit):
    base = ["generate", "--model", str(tiny.path), "--max-tokens", "2"]
    if "--prompt-ids" not in args:
        base += ["--prompt", "hi"]
    res = run(*base, *args)
    assert res.returncode == 2, res.stderr
    assert culprit in res.stderr and "Traceback" not in res.stderr
