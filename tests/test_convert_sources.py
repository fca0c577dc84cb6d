"""Weight sources (random spec, Hugging Face bf16 safetensors, GGUF helpers) and bad inputs, each rejected
before any file is written."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from anemll_fast.convert import ArchConfig, ConvertError, convert, convert_random
from anemll_fast.convert.gguf_source import unpermute_qk
from anemll_fast.convert.hf import load_hf_checkpoint
from anemll_fast.convert.weights import random_weights
from anemll_fast.errors import AnemllError

SPEC = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
SMALL = dict(context_length=16, batch_size=4, split_lm_head=2, progress=False)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    # round-to-nearest-even float32 -> bfloat16 bit patterns
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_bf16_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        raw = _bf16_bits(arr).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_hf_checkpoint(tmp_path, drop=None, model_type="qwen2"):
    cfg = ArchConfig.from_hf_config(dict(SPEC, model_type=model_type))
    w = random_weights(cfg, seed=5)
    if drop:
        w.pop(drop)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(dict(SPEC, model_type=model_type)))
    write_bf16_safetensors(ckpt / "model.safetensors", w)
    return ckpt, cfg, w


def _assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_hf_bf16_checkpoint_reads_without_torch(tmp_path):
    ckpt, cfg, w = make_hf_checkpoint(tmp_path)
    loaded = load_hf_checkpoint(ckpt)
    assert loaded.config.arch == "qwen2" and loaded.config.qkv_bias
    for name, arr in w.items():
        got = loaded.weights[name]
        assert got.dtype == np.float32 and got.shape == arr.shape
        np.testing.assert_allclose(got, arr, rtol=2 ** -8, atol=1e-30)  # bf16 keeps 8 mantissa bits
    out = convert(ckpt, tmp_path / "out", **SMALL)
    assert (out / "meta.yaml").is_file() and (out / "qwen_lm_head.mlpackage").is_dir()


def test_random_spec_file_and_cli(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(SPEC, model_type="llama", seed=1)))
    out = convert_random(spec, tmp_path / "a", **SMALL)
    assert (out / "llama_FFN_PF_chunk_01of01.mlpackage").is_dir()
    from anemll_fast.cli import main

    rc = main(["convert", "--random", str(spec), str(tmp_path / "b"), "--context", "16", "--batch", "4",
               "--chunks", "2", "--split-lm-head", "4", "--lut-ffn", "4", "--argmax-head", "--quiet"])
    assert rc == 0 and (tmp_path / "b" / "llama_FFN_PF_lut4_chunk_02of02.mlpackage").is_dir()
    # a bad input through the CLI: exit code 2 and the culprit on stderr
    proc = subprocess.run([sys.executable, "-m", "anemll_fast", "convert", "--random", str(spec),
                           str(tmp_path / "c"), "--context", "18", "--batch", "4", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not divisible by batch_size 4" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ConvertError, match="unsupported architecture 'gpt2'"):
        convert(dict(SPEC, model_type="gpt2"), tmp_path / "out", **SMALL)
    ckpt, _, _ = make_hf_checkpoint(tmp_path)
    (ckpt / "config.json").write_text(json.dumps(dict(SPEC, model_type="mistral")))
    with pytest.raises(ConvertError, match="mistral") as exc:
        convert(ckpt, tmp_path / "out", **SMALL)
    assert isinstance(exc.value, AnemllError) and isinstance(exc.value, ValueError)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_checkpoint_missing_tensor(tmp_path):
    ckpt, _, _ = make_hf_checkpoint(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConvertError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(ckpt, tmp_path / "out", **SMALL)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_context_not_divisible_by_batch(tmp_path):
    with pytest.raises(ConvertError, match="context_length 30 is not divisible by batch_size 8"):
        convert(SPEC, tmp_path / "out", context_length=30, batch_size=8, progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_vocab_not_splittable(tmp_path):
    with pytest.raises(ConvertError, match=r"vocab_size 320 cannot be split into 7 .*split_lm_head"):
        convert(SPEC, tmp_path / "out", context_length=16, batch_size=4, split_lm_head=7, progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(num_chunks=3), "num_chunks 3 exceeds"),
    (dict(lut_ffn=5), "lut_ffn must be one of"),
    (dict(palettize_mode="magic"), "palettize_mode"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_options(tmp_path, kwargs, culprit):
    args = dict(SMALL, **kwargs)
    with pytest.raises(ConvertError, match=culprit):
        convert(SPEC, tmp_path / "out", **args)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_source_and_non_empty_output(tmp_path):
    with pytest.raises(ConvertError, match="source not found"):
        convert(tmp_path / "nope", tmp_path / "out", **SMALL)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert(SPEC, out, **SMALL)
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_mid_conversion_leaves_no_partial_directory(tmp_path, monkeypatch):
    from anemll_fast.convert import graph

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(graph, "build_lm_head_program", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        convert(SPEC, tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_gguf_qk_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 3, 8, 5
    w = rng.standard_normal((n_head * head_dim, hidden))
    # llama.cpp's convert script: rows of each head reordered so rope pairs are interleaved
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    assert not np.array_equal(permuted, w)
