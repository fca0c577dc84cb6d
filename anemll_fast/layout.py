"""The ANEMLL layout: file names and tensor shapes of each part, from a few
architecture numbers. Used to write ready configs for published releases and
to describe a model before any file exists (benchmarks with the null backend).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from anemll_fast.config import ComponentConfig, ModelConfig, Shapes, TensorSpec
from anemll_fast.errors import ConfigError

KV_STATE = "model_model_kv_cache_0"
# Gemma 3 (ANEMLL 0.3.5): sliding layers' cache and global layers' cache.
LOCAL_STATE, GLOBAL_STATE = "model_model_kv_cache_local", "model_model_kv_cache_global"


def _lut(bits: Optional[int]) -> str:
    return f"_lut{bits}" if bits else ""


def embeddings_stem(prefix: str, lut: Optional[int]) -> str:
    return f"{prefix}_embeddings{_lut(lut)}"


def ffn_stem(prefix: str, lut: Optional[int], chunk: int, num_chunks: int) -> str:
    """chunk is 0-based; ANEMLL numbers from 01 and always adds the suffix, even for one chunk."""
    return f"{prefix}_FFN_PF{_lut(lut)}_chunk_{chunk + 1:02d}of{num_chunks:02d}"


def lm_head_stem(prefix: str, lut: Optional[int]) -> str:
    return f"{prefix}_lm_head{_lut(lut)}"


def monolithic_stem(prefix: str, lut: Optional[int]) -> str:
    """ANEMLL 0.3.5's single-file model: {prefix}_monolithic_full[_lutN]."""
    return f"{prefix}_monolithic_full{_lut(lut)}"


def _bits(value: Union[int, str, None]) -> Optional[int]:
    return None if value in (None, "none") else int(value)


def part_names(
    prefix: str,
    num_chunks: int,
    lut_embeddings: Union[int, str, None] = None,
    lut_ffn: Union[int, str, None] = None,
    lut_lmhead: Union[int, str, None] = None,
    suffix: str = ".mlmodelc",
) -> Dict[str, Union[str, List[str]]]:
    """File names ANEMLL gives the parts (chunks always carry `_chunk_NNofMM`)."""
    return {
        "embeddings": embeddings_stem(prefix, _bits(lut_embeddings)) + suffix,
        "ffn": [ffn_stem(prefix, _bits(lut_ffn), i, num_chunks) + suffix for i in range(num_chunks)],
        "lm_head": lm_head_stem(prefix, _bits(lut_lmhead)) + suffix,
    }


def _t(name: str, shape, dtype: str = "FLOAT16", enumerated=()) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(shape), data_type=dtype, enumerated_shapes=tuple(tuple(s) for s in enumerated))


def anemll_config(
    *,
    prefix: str,
    hidden_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    context_length: int = 512,
    state_length: Optional[int] = None,
    batch_size: int = 64,
    num_chunks: int = 1,
    split_lm_head: int = 16,
    argmax_in_model: bool = False,
    lut_embeddings: Union[int, str, None] = None,
    lut_ffn: Union[int, str, None] = None,
    lut_lmhead: Union[int, str, None] = None,
    suffix: str = ".mlmodelc",
    model_info: Optional[dict] = None,
    layer_types: Optional[Sequence[str]] = None,
    sliding_window: Optional[int] = None,
    monolithic: bool = False,
) -> ModelConfig:
    """The ModelConfig of an ANEMLL model with these dimensions: chunked, or one monolithic file (lut_ffn names
    it). Gemma 3: `layer_types` ("sliding_attention"/"full_attention" per layer) and `sliding_window` give the
    local and global states and, when the window is shorter than the context, the rotate functions."""
    for key, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                       ("head_dim", head_dim), ("vocab_size", vocab_size), ("context_length", context_length),
                       ("batch_size", batch_size), ("num_chunks", num_chunks), ("split_lm_head", split_lm_head)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    if vocab_size % split_lm_head:
        raise ConfigError(f"split_lm_head: vocab_size {vocab_size} is not divisible into {split_lm_head} parts")
    if num_layers % num_chunks:
        raise ConfigError(f"num_chunks: {num_layers} layers do not split evenly into {num_chunks} chunks")
    if monolithic and num_chunks != 1:
        raise ConfigError(f"num_chunks: a monolithic model is one file, got {num_chunks}")
    names = part_names(prefix, num_chunks, lut_embeddings, lut_ffn, lut_lmhead, suffix)
    if monolithic:
        names["ffn"] = [monolithic_stem(prefix, _bits(lut_ffn)) + suffix]
    H, ctx, B = hidden_size, context_length, batch_size
    if layer_types is None:
        states = {KV_STATE: _t(KV_STATE, (2 * num_layers, num_kv_heads, state_length or ctx, head_dim))}
    else:
        if len(layer_types) != num_layers or not sliding_window:
            raise ConfigError("layer_types: one kind per layer, with a sliding_window, expected")
        n_local = sum(1 for t in layer_types if t == "sliding_attention")
        states = {LOCAL_STATE: _t(LOCAL_STATE, (2 * n_local, num_kv_heads, min(sliding_window, ctx), head_dim)),
                  GLOBAL_STATE: _t(GLOBAL_STATE, (2 * (num_layers - n_local), num_kv_heads, state_length or ctx,
                                                  head_dim))}
    rotate = layer_types is not None and sliding_window < ctx
    functions = ["infer", "prefill"] + (["infer_rotate", "prefill_rotate"] if rotate else [])
    embeddings = ComponentConfig(
        file_path=names["embeddings"],  # type: ignore[arg-type]
        inputs={"input_ids": _t("input_ids", (1, B), "INT32", [(1, B), (1, 1)])},
        outputs={"hidden_states": _t("hidden_states", (1, B, H), enumerated=[(1, B, H), (1, 1, H)])},
    )
    part = vocab_size // split_lm_head
    if argmax_in_model:
        head_outputs = {
            "argmax_idx": _t("argmax_idx", (split_lm_head,), "INT32"),
            "argmax_val": _t("argmax_val", (split_lm_head,)),
        }
    else:
        head_outputs = {f"logits{i}": _t(f"logits{i}", (1, 1, part)) for i in range(1, split_lm_head + 1)}
    by_role: Dict[str, List[ComponentConfig]] = {f: [] for f in functions}
    for i, path in enumerate(names["ffn"]):  # type: ignore[union-attr]
        last = i == num_chunks - 1
        for function in functions:
            seq = B if function.startswith("prefill") else 1
            first = _t("input_ids", (1, seq), "INT32") if monolithic else _t("hidden_states", (1, seq, H))
            if monolithic:
                outputs = dict(head_outputs)
            else:
                out = 1 if last and seq > 1 else seq
                outputs = {"output_hidden_states": _t("output_hidden_states", (1, out, H))}
            by_role[function].append(ComponentConfig(
                file_path=path,
                inputs={
                    first.name: first,
                    "position_ids": _t("position_ids", (seq,), "INT32"),
                    "causal_mask": _t("causal_mask", (1, 1, seq, ctx)),
                    "current_pos": _t("current_pos", (1,), "INT32"),
                },
                outputs=outputs,
                states=dict(states),
                functions=list(functions),
                function=function,
            ))
    lm_head = ComponentConfig(
        file_path=names["lm_head"],  # type: ignore[arg-type]
        inputs={"hidden_states": _t("hidden_states", (1, 1, H))},
        outputs=head_outputs,
    )
    info = dict(model_info or {})
    info.setdefault("model_type", prefix)
    info.setdefault("parameters", {
        "context_length": ctx,
        "batch_size": B,
        "num_chunks": num_chunks,
        "model_prefix": prefix,
        "lut_embeddings": lut_embeddings or "none",
        "lut_ffn": lut_ffn or "none",
        "lut_lmhead": lut_lmhead or "none",
        "split_lm_head": split_lm_head,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
    })
    if argmax_in_model:
        info["vocab_size"] = vocab_size
        info["lm_head_chunk_sizes"] = [part] * split_lm_head
    if sliding_window is not None:
        info["sliding_window"] = sliding_window
    if monolithic:
        info["layout"] = "monolithic"
    return ModelConfig(
        model_info=info,
        shapes=Shapes(batch_size=B, context_length=ctx, hidden_size=H, vocab_size=vocab_size),
        embeddings=None if monolithic else embeddings,
        ffn_prefill=by_role["prefill"],
        ffn_infer=by_role["infer"],
        ffn_infer_rotate=by_role.get("infer_rotate"),
        ffn_prefill_rotate=by_role.get("prefill_rotate"),
        lm_head=None if monolithic else lm_head,
    )
