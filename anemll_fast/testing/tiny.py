"""Tiny random ANEMLL-layout models for tests, with the numpy weights they were built from."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from anemll_fast.convert import graph
from anemll_fast.convert.arch import ArchConfig
from anemll_fast.convert.pipeline import build_model, load_random, resolve_options

WEIGHTS_FILE = "tiny_weights.npz"
CONFIG_FILE = "tiny_config.json"


@dataclasses.dataclass
class TinyModel:
    """A built tiny model: its directory, architecture and float32 weights (Hugging Face tensor names)."""

    path: Path
    config: ArchConfig
    weights: Dict[str, np.ndarray]
    context_length: int
    batch_size: int
    num_chunks: int
    split_lm_head: int
    argmax_head: bool
    monolithic: bool = False

    def __fspath__(self) -> str:
        return str(self.path)

    def reference(self):
        """A fresh numpy ReferenceDecoder of this model, with a KV cache of context_length."""
        from anemll_fast.testing.reference import ReferenceDecoder

        return ReferenceDecoder(self.weights, self.config, max_len=self.context_length)


def build_tiny_model(out_dir: Union[str, os.PathLike], arch: str = "llama", *, num_chunks: int = 1,
                     context_length: int = 32, batch_size: int = 8, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, head_dim: Optional[int] = None,
                     intermediate_size: int = 128, vocab_size: int = 512, lut_ffn: Optional[int] = None,
                     lut_lmhead: Optional[int] = None, lut_embeddings: Optional[int] = None,
                     split_lm_head: int = 2, argmax_head: bool = False, tied: bool = True, seed: int = 0,
                     model_prefix: Optional[str] = None, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                     overwrite: bool = False, monolithic: bool = False, sliding_window: int = 8,
                     layer_types: Optional[Sequence[str]] = None, rope_local_theta: float = 10000.0,
                     query_pre_attn_scalar: Optional[float] = None, contexts: Optional[Sequence[int]] = None,
                     rope_scaling: Optional[Dict[str, Any]] = None) -> TinyModel:
    """Build a tiny random model directory (meta.yaml, parts, byte-level tokenizer.json when vocab_size >= 259)
    in about a second. The float32 weights and config are also saved there as tiny_weights.npz and
    tiny_config.json (see load_tiny_model).

    monolithic: one file (ANEMLL 0.3.5 --monolithic). Gemma 3 ("gemma3"): sliding_window, layer_types (default:
    every second layer global), rope_local_theta and query_pre_attn_scalar (default head_dim)."""
    spec = {
        "model_type": arch, "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim if head_dim is not None else hidden_size // num_heads,
        "rope_theta": rope_theta, "rms_norm_eps": rms_norm_eps, "tie_word_embeddings": tied,
        "name": f"tiny-{arch}", "seed": seed,
    }
    if arch == "gemma3":
        spec.update({
            "sliding_window": sliding_window, "rope_local_base_freq": rope_local_theta,
            "layer_types": list(layer_types) if layer_types is not None else
            ["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)],
            "query_pre_attn_scalar": query_pre_attn_scalar or spec["head_dim"],
        })
    if rope_scaling is not None:
        spec["rope_scaling"] = dict(rope_scaling)
    loaded = load_random(spec)
    opts = resolve_options(loaded.config, context_length=context_length, batch_size=batch_size,
                           num_chunks=num_chunks, lut_ffn=lut_ffn, lut_lmhead=lut_lmhead,
                           lut_embeddings=lut_embeddings, palettize_mode="uniform", split_lm_head=split_lm_head,
                           argmax_head=argmax_head, model_prefix=model_prefix, monolithic=monolithic,
                           contexts=contexts)

    def save_weights(stage: Path) -> None:
        np.savez(stage / WEIGHTS_FILE, **loaded.weights)
        (stage / CONFIG_FILE).write_text(json.dumps(loaded.config.to_dict(), indent=2) + "\n", encoding="utf-8")

    path = build_model(loaded, Path(out_dir), opts, progress=False, overwrite=overwrite, extra_files=save_weights)
    return TinyModel(path, loaded.config, loaded.weights, opts.context_length, batch_size, num_chunks,
                     opts.split_lm_head, argmax_head, monolithic)


def load_weights(model_dir: Union[str, os.PathLike]) -> Tuple[Dict[str, np.ndarray], ArchConfig]:
    """Weights and config saved by build_tiny_model in model_dir."""
    model_dir = Path(model_dir)
    with np.load(model_dir / WEIGHTS_FILE) as npz:
        weights = {k: npz[k] for k in npz.files}
    cfg = ArchConfig.from_dict(json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    return weights, cfg


__all__ = ["TinyModel", "build_tiny_model", "load_weights", "graph"]
