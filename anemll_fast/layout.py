"""The ANEMLL layout: file names and tensor shapes of each part, from a few
architecture numbers. Used to write ready configs for published releases and
to describe a model before any file exists (benchmarks with the null backend).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

from anemll_fast.config import ComponentConfig, ModelConfig, Shapes, TensorSpec
from anemll_fast.errors import ConfigError

KV_STATE = "model_model_kv_cache_0"


def _lut(bits: Optional[int]) -> str:
    return f"_lut{bits}" if bits else ""


def embeddings_stem(prefix: str, lut: Optional[int]) -> str:
    return f"{prefix}_embeddings{_lut(lut)}"


def ffn_stem(prefix: str, lut: Optional[int], chunk: int, num_chunks: int) -> str:
    """chunk is 0-based; ANEMLL numbers from 01 and always adds the suffix, even for one chunk."""
    return f"{prefix}_FFN_PF{_lut(lut)}_chunk_{chunk + 1:02d}of{num_chunks:02d}"


def lm_head_stem(prefix: str, lut: Optional[int]) -> str:
    return f"{prefix}_lm_head{_lut(lut)}"


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
) -> ModelConfig:
    """The ModelConfig of an ANEMLL chunked model with these dimensions."""
    for key, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                       ("head_dim", head_dim), ("vocab_size", vocab_size), ("context_length", context_length),
                       ("batch_size", batch_size), ("num_chunks", num_chunks), ("split_lm_head", split_lm_head)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    if vocab_size % split_lm_head:
        raise ConfigError(f"split_lm_head: vocab_size {vocab_size} is not divisible into {split_lm_head} parts")
    if num_layers % num_chunks:
        raise ConfigError(f"num_chunks: {num_layers} layers do not split evenly into {num_chunks} chunks")
    names = part_names(prefix, num_chunks, lut_embeddings, lut_ffn, lut_lmhead, suffix)
    H, ctx, B = hidden_size, context_length, batch_size
    state = _t(KV_STATE, (2 * num_layers, num_kv_heads, state_length or ctx, head_dim))
    embeddings = ComponentConfig(
        file_path=names["embeddings"],  # type: ignore[arg-type]
        inputs={"input_ids": _t("input_ids", (1, B), "INT32", [(1, B), (1, 1)])},
        outputs={"hidden_states": _t("hidden_states", (1, B, H), enumerated=[(1, B, H), (1, 1, H)])},
    )
    prefill, infer = [], []
    for i, path in enumerate(names["ffn"]):  # type: ignore[union-attr]
        last = i == num_chunks - 1
        for function, seq, out in (("prefill", B, 1 if last else B), ("infer", 1, 1)):
            comp = ComponentConfig(
                file_path=path,
                inputs={
                    "hidden_states": _t("hidden_states", (1, seq, H)),
                    "position_ids": _t("position_ids", (seq,), "INT32"),
                    "causal_mask": _t("causal_mask", (1, 1, seq, ctx)),
                    "current_pos": _t("current_pos", (1,), "INT32"),
                },
                outputs={"output_hidden_states": _t("output_hidden_states", (1, out, H))},
                states={KV_STATE: state},
                functions=["infer", "prefill"],
                function=function,
            )
            (prefill if function == "prefill" else infer).append(comp)
    part = vocab_size // split_lm_head
    if argmax_in_model:
        head_outputs = {
            "argmax_idx": _t("argmax_idx", (split_lm_head,), "INT32"),
            "argmax_val": _t("argmax_val", (split_lm_head,)),
        }
    else:
        head_outputs = {f"logits{i}": _t(f"logits{i}", (1, 1, part)) for i in range(1, split_lm_head + 1)}
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
    return ModelConfig(
        model_info=info,
        shapes=Shapes(batch_size=B, context_length=ctx, hidden_size=H, vocab_size=vocab_size),
        embeddings=embeddings,
        ffn_prefill=prefill,
        ffn_infer=infer,
        lm_head=lm_head,
    )
