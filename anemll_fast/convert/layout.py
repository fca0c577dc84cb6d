"""ANEMLL file names and meta.yaml, as ANEMLL's converter (0.3.5) writes them."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from anemll_fast.layout import embeddings_stem, ffn_stem, lm_head_stem  # noqa: F401 (re-exported)

ANEMLL_VERSION = "0.3.5"


def default_prefix(arch: str) -> str:
    return "llama" if arch == "llama" else "qwen"


def default_split_lm_head(arch: str) -> int:
    return 8 if arch == "llama" else 16


def _yaml_lut(bits: Optional[int]) -> str:
    return str(bits) if bits else "none"


def meta_yaml(*, name: str, arch: str, context_length: int, state_length: int, batch_size: int,
              lut_embeddings: Optional[int], lut_ffn: Optional[int], lut_lmhead: Optional[int], num_chunks: int,
              prefix: str, split_lm_head: int, vocab_size: int, chunk_sizes: List[int], argmax_in_model: bool,
              source: str) -> str:
    """meta.yaml text. Parts are named as compiled .mlmodelc like ANEMLL's; loaders fall back to the .mlpackage
    of the same stem (we cannot compile off macOS)."""
    sizes = ", ".join(str(s) for s in chunk_sizes)
    return f"""model_info:
  name: anemll-{name}-ctx{context_length}
  version: {ANEMLL_VERSION}
  description: |
    Demonstrates running {name} on Apple Neural Engine
    Context length: {context_length}
    Batch size: {batch_size}
    Chunks: {num_chunks}
    Converted by anemll_fast from {source}
  license: MIT
  author: anemll_fast
  framework: Core ML
  language: Python
  architecture: {arch}
  parameters:
    context_length: {context_length}
    state_length: {state_length}
    batch_size: {batch_size}
    lut_embeddings: {_yaml_lut(lut_embeddings)}
    lut_ffn: {_yaml_lut(lut_ffn)}
    lut_lmhead: {_yaml_lut(lut_lmhead)}
    num_chunks: {num_chunks}
    model_prefix: {prefix}
    embeddings: {embeddings_stem(prefix, lut_embeddings)}.mlmodelc
    lm_head: {lm_head_stem(prefix, lut_lmhead)}.mlmodelc
    ffn: {ffn_stem(prefix, lut_ffn, 0, num_chunks)}.mlmodelc
    split_lm_head: {split_lm_head}
    vocab_size: {vocab_size}
    lm_head_chunk_sizes: [{sizes}]
    argmax_in_model: {"true" if argmax_in_model else "false"}
"""


def part_names(prefix: str, num_chunks: int, lut_embeddings: Optional[int], lut_ffn: Optional[int],
               lut_lmhead: Optional[int]) -> List[str]:
    """All .mlpackage names of a converted model, in pipeline order."""
    names = [embeddings_stem(prefix, lut_embeddings) + ".mlpackage"]
    names += [ffn_stem(prefix, lut_ffn, i, num_chunks) + ".mlpackage" for i in range(num_chunks)]
    names.append(lm_head_stem(prefix, lut_lmhead) + ".mlpackage")
    return names


def is_complete(out_dir: Path) -> bool:
    """A model directory is complete once meta.yaml exists (it is written last, then the directory renamed)."""
    return (Path(out_dir) / "meta.yaml").is_file()
