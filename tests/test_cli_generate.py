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


def test_generate_json_with_prompt_ids_matches_reference(tiny):
    res = run("generate", "--model", str(tiny.path), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "6",
              "--backend", "reference", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"text", "tokens", "prompt_tokens", "prefill_tps", "decode_tps", "ttft_ms", "finish_reason"}
    assert out["prompt_tokens"] == 5
    expected = tiny.reference().greedy([5, 6, 7, 8, 9], 6)
    assert out["tokens"] == expected[: len(out["tokens"])] and out["tokens"]
    assert out["finish_reason"] in ("length", "stop")


def test_generate_streams_text_and_prints_speeds(tiny):
    res = run("generate", "--model", str(tiny.path), "--prompt", "hello", "--max-tokens", "4",
              "--temperature", "0.7", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "[backend: reference]" in res.stderr
    assert "prefill:" in res.stderr and "decode:" in res.stderr and "ttft:" in res.stderr
    again = run("generate", "--model", str(tiny.path), "--prompt", "hello", "--max-tokens", "4",
                "--temperature", "0.7", "--seed", "3")
    assert again.stdout == res.stdout  # a seed reproduces


def test_chat_py_compatible_flags(tiny):
    res = run("generate", "--meta", str(tiny.path / "meta.yaml"), "--prompt", "hi", "--no-template",
              "--max-tokens", "2", "--context-length", "64", "--batch-size", "8", "--json")
    assert res.returncode == 0, res.stderr
    res = run("generate", "--d", str(tiny.path), "--prompt", "hi", "--max-tokens", "2", "--json",
              "--tokenizer", str(tiny.path), "--ffn", "llama_FFN_PF_chunk_01of01.mlmodelc")
    assert res.returncode == 0, res.stderr
    res = run("generate", "--d", str(tiny.path), "--prompt", "hi", "--context-length", "512")
    assert res.returncode == 2 and "--context-length 512" in res.stderr


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
