"""The independent numpy reference decoder: KV-cache consistency, GQA, and a hand-computed one-token case."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from anemll_fast.convert import ArchConfig
from anemll_fast.convert.weights import random_weights
from anemll_fast.testing.reference import ReferenceDecoder


def _cfg(arch, **kw):
    base = dict(arch=arch, vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    base.update(kw)
    return ArchConfig(**base)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_block_prefill_equals_token_by_token(arch):
    cfg = _cfg(arch)
    ref = ReferenceDecoder(random_weights(cfg, 1), cfg, max_len=16)
    prompt = [5, 17, 200, 3, 99]
    block = ref.prefill(prompt)
    ref.reset()
    for t in prompt[:-1]:
        ref.step(t)
    np.testing.assert_allclose(ref.step(prompt[-1]), block, rtol=1e-4, atol=1e-4)
    toks = ref.greedy(prompt, 6)
    assert len(toks) == 6 and all(0 <= t < cfg.vocab_size for t in toks)


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = _cfg("llama")
    w = random_weights(cfg, 2)
    mha = dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)
    w2 = dict(w)
    rep = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        for n in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{n}.weight"
            # query head h reads kv head h // rep
            w2[key] = np.repeat(w[key].reshape(cfg.num_kv_heads, cfg.head_dim, -1), rep, axis=0).reshape(
                cfg.num_heads * cfg.head_dim, -1)
    a = ReferenceDecoder(w, cfg).prefill([1, 2, 3, 4])
    b = ReferenceDecoder(w2, mha).prefill([1, 2, 3, 4])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_single_token_hand_computed():
    # At position 0 RoPE is the identity and attention over one key returns its value exactly.
    cfg = _cfg("llama", num_layers=1, num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
    w = random_weights(cfg, 3)
    tok = 42
    eps = cfg.rms_norm_eps
    rms = lambda x, g: x / np.sqrt((x ** 2).mean() + eps) * g  # noqa: E731
    p = "model.layers.0."
    x = w["model.embed_tokens.weight"][tok].astype(np.float64)
    h = rms(x, w[p + "input_layernorm.weight"])
    v = w[p + "self_attn.v_proj.weight"] @ h
    x = x + w[p + "self_attn.o_proj.weight"] @ np.concatenate([v, v])
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    g, u = w[p + "mlp.gate_proj.weight"] @ h, w[p + "mlp.up_proj.weight"] @ h
    x = x + w[p + "mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * u)
    expected = w["model.embed_tokens.weight"] @ rms(x, w["model.norm.weight"])
    got = ReferenceDecoder(w, cfg).prefill([tok])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_rope_depends_only_on_relative_position():
    cfg = _cfg("qwen3")
    ref = ReferenceDecoder(random_weights(cfg, 4), cfg)
    q = np.random.default_rng(0).standard_normal((1, 1, cfg.head_dim))
    k = np.random.default_rng(1).standard_normal((1, 1, cfg.head_dim))
    dots = [float((ref._rope(q, np.array([m + 3])) * ref._rope(k, np.array([m]))).sum()) for m in (0, 5, 11)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-6)


def test_bad_tokens_rejected():
    cfg = _cfg("qwen2")
    ref = ReferenceDecoder(random_weights(cfg, 0), cfg, max_len=4)
    with pytest.raises(ValueError, match="out of range"):
        ref.prefill([cfg.vocab_size])
    with pytest.raises(ValueError, match="exceed max_len"):
        ref.prefill([1, 2, 3, 4, 5])
