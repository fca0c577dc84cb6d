"""`anemll-fast inspect` end to end, in a subprocess."""
import json
import subprocess
import sys

import pytest

import anemll_stub
from anemll_fast.config import ModelConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return anemll_stub.build(tmp_path_factory.mktemp("inspect") / "m", num_chunks=2)


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "anemll_fast", *args], capture_output=True, text=True, timeout=300
    )


def test_inspect_prints_components_io_states_and_ops(model_dir):
    res = run("inspect", str(model_dir))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "2 FFN chunk(s), unified FFN, batch prefill, 4 logits part(s)" in out
    assert "qwen_FFN_PF_chunk_02of02.mlpackage  (mlpackage, multifunction, default 'infer')" in out
    assert "function prefill" in out and "function infer" in out
    assert "input  causal_mask: FLOAT16 [1, 1, 4, 16]" in out
    assert "state  model_model_kv_cache_0: FLOAT16 [4, 1, 16, 8]" in out
    assert "output logits4: FLOAT16 [1, 1, 16]" in out
    assert "read_state 1" in out and "linear 4" in out
    assert "Failed to load" not in res.stderr


def test_inspect_json_is_the_model_config(model_dir):
    res = run("inspect", str(model_dir), "--json")
    assert res.returncode == 0, res.stderr
    config = ModelConfig.from_dict(json.loads(res.stdout), model_dir=model_dir)
    assert config == ModelConfig.from_anemll_dir(model_dir)


def test_inspect_single_file_and_config_json(model_dir, tmp_path):
    res = run("inspect", str(model_dir / "qwen_lm_head.mlpackage"))
    assert res.returncode == 0, res.stderr
    assert "output logits1" in res.stdout
    cfg = tmp_path / "c.json"
    ModelConfig.from_anemll_dir(model_dir).to_json(cfg)
    res = run("inspect", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "qwen_embeddings.mlpackage" in res.stdout


def test_inspect_bad_input_exits_2_with_message(tmp_path):
    res = run("inspect", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert "missing" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "meta.yaml").write_text("model_info: {parameters: {num_chunks: 0}}\n")
    res = run("inspect", str(tmp_path))
    assert res.returncode == 2
    assert "num_chunks" in res.stderr and "Traceback" not in res.stderr
