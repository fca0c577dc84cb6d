"""GGUF files (llama.cpp): weights dequantized with the gguf package, tokenizer rebuilt as tokenizer.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from anemll_fast.convert.arch import ArchConfig, normalize_arch
from anemll_fast.convert.errors import ConvertError
from anemll_fast.convert.tokenizer import write_tokenizer_config

# GGUF tensor names -> Hugging Face names ({i} = layer).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer regexes of the byte-level BPE families llama.cpp names in tokenizer.ggml.pre.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as exc:  # a malformed field: name it
        raise ConvertError(f"GGUF field {key} cannot be read: {exc}") from None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k row permutation (interleaved rope pairs) back to Hugging Face rotate-half rows."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: Path, arch: Optional[str] = None):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from anemll_fast.convert.pipeline import LoadedSource

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ConvertError(f"cannot read GGUF file {path}: {exc}") from None
    gg_arch = _field(reader, "general.architecture")
    if gg_arch is None:
        raise ConvertError(f"GGUF file {path} has no general.architecture")
    family = normalize_arch(gg_arch if arch is None else arch)
    if arch is not None and normalize_arch(gg_arch) != family:
        raise ConvertError(f"--arch {arch} does not match the GGUF architecture {gg_arch}")

    def need(key: str) -> Any:
        value = _field(reader, f"{gg_arch}.{key}")
        if value is None:
            raise ConvertError(f"GGUF file {path} is missing field {gg_arch}.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{gg_arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    kv_heads = int(_field(reader, f"{gg_arch}.attention.head_count_kv", heads))
    head_dim = _field(reader, f"{gg_arch}.attention.key_length") or hidden // heads
    name = _field(reader, "general.name", path.stem)
    cfg = ArchConfig(
        arch=family, vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{gg_arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        name=str(name).replace(" ", "-"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )

    weights: Dict[str, np.ndarray] = {}
    for gname, t in tensors.items():
        hf = _GLOBAL_NAMES.get(gname)
        if hf is None and gname.startswith("blk."):
            _, idx, rest = gname.split(".", 2)
            if rest in _LAYER_NAMES:
                hf = f"model.layers.{int(idx)}.{_LAYER_NAMES[rest]}"
        if hf is None:
            continue
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ConvertError(f"GGUF tensor {gname} ({t.tensor_type.name}) cannot be dequantized: {exc}") from None
        # GGUF lists dims innermost first; numpy data is already row-major (out, in) like Hugging Face.
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if family == "llama" and hf.endswith("q_proj.weight"):
            arr = unpermute_qk(arr, heads)
        elif family == "llama" and hf.endswith("k_proj.weight"):
            arr = unpermute_qk(arr, kv_heads)
        weights[hf] = arr

    def write_tok(out_dir: Path) -> None:
        if tokens:
            write_gguf_tokenizer(reader, out_dir, cfg)

    return LoadedSource(cfg, weights, write_tok, f"GGUF {path.name}")


def write_gguf_tokenizer(reader, out_dir: Path, cfg: ArchConfig) -> None:
    """tokenizer.json + tokenizer_config.json from a GGUF's embedded byte-level BPE ('gpt2') tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConvertError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: List[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("qwen2", "llama-bpe"))
    if pre in ("qwen2",):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level])
    elif pre in ("llama-bpe",):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole, before BPE.
    added = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
    if added:
        tok.add_tokens(added)

    def tok_name(key: str) -> Optional[str]:
        idx = _field(reader, key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = tok_name("tokenizer.ggml.bos_token_id"), tok_name("tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    write_tokenizer_config(out_dir, bos=bos, eos=eos, pad=tok_name("tokenizer.ggml.padding_token_id"),
                           unk=tok_name("tokenizer.ggml.unknown_token_id"),
                           chat_template=_field(reader, "tokenizer.chat_template"), add_bos=add_bos)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
