"""Canonical weight set of a decoder, keyed by Hugging Face tensor names, stored as numpy float32."""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

from anemll_fast.convert.arch import ArchConfig
from anemll_fast.convert.errors import ConvertError

Weights = Dict[str, np.ndarray]


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def expected_shapes(cfg: ArchConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor the converter needs, with its (out, in) shape as Hugging Face stores it."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.is_gemma3:  # four norms per layer
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_weights(cfg: ArchConfig, weights: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
    """Raise ConvertError naming missing tensors, wrong shapes or non-finite values."""
    shapes = expected_shapes(cfg)
    missing = [name for name in shapes if name not in weights]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConvertError(f"{source} is missing tensor(s): {shown}")
    for name, shape in shapes.items():
        arr = weights[name]
        if tuple(arr.shape) != shape:
            raise ConvertError(
                f"{source}: tensor {name} has shape {tuple(arr.shape)}, expected {shape} from the config"
            )
        if not np.all(np.isfinite(arr)):
            raise ConvertError(f"{source}: tensor {name} holds NaN or infinite values")


def lm_head_weight(cfg: ArchConfig, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The output projection: its own tensor, or the embeddings when tied."""
    if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
        return weights["model.embed_tokens.weight"]
    return weights["lm_head.weight"]


def random_weights(cfg: ArchConfig, seed: int = 0) -> Weights:
    """Seeded random weights, scaled so that activations stay O(1) and logits are well spread."""
    rng = np.random.default_rng(seed)
    out: Weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            # Gemma stores the gain as an offset from 1.
            arr = (0.0 if cfg.is_gemma3 else 1.0) + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            arr = 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight" or name == "lm_head.weight":
            # Small embeddings so that the layers, not the token's own embedding, dominate the residual stream
            # (otherwise a tied head just echoes the input token).
            arr = 0.25 * rng.standard_normal(shape)
            if cfg.is_gemma3 and name == "model.embed_tokens.weight":
                arr /= np.sqrt(cfg.hidden_size)  # Gemma multiplies embeddings by sqrt(hidden_size)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = arr.astype(np.float32)
    return out
