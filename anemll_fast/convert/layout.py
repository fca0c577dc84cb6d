"""ANEMLL file names and meta.yaml, as ANEMLL's converter (0.3.5) writes them."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from anemll_fast.layout import embeddings_stem, ffn_stem, lm_head_stem, monolithic_stem  # noqa: F401 (re-exported)

ANEMLL_VERSION = "0.3.5"


def default_prefix(arch: str) -> str:
    return {"llama": "llama", "gemma3": "gemma3"}.get(arch, "qwen")


def default_split_lm_head(arch: str) -> int:
    return 8 if arch == "llama" else 16



def _yaml_lut(bits: Optional[int]) -> str:
    return str(bits) if bits else "none"


def meta_yaml(*, name: str, arch: str, context_length: int, state_length: int, batch_size: int,
              lut_embeddings: Optional[int], lut_ffn: Optional[int], lut_lmhead: Optional[int], num_chunks: int,
              prefix: str, split_lm_head: int, vocab_size: int, chunk_sizes: List[int], argmax_in_model: bool,
              source: str, monolithic: bool = False, sliding_window: Optional[int] = None,
              functions: Sequence[str] = ("infer", "prefill"), contexts: Sequence[int] = ()) -> str:
    """meta.yaml text. Parts are named as compiled .mlmodelc like ANEMLL's; loaders fall back to the .mlpackage
    of the same stem (we cannot compile off macOS).

    Our prefill functions write the cache at current_pos, hence `prefill_dynamic_slice: true`; sliding-window
    models add `sliding_window`, `attention_size` (the context) and their functions, as ANEMLL 0.3.5 does."""
    sizes = ", ".join(str(s) for s in chunk_sizes)
    extra = "    prefill_dynamic_slice: true\n"
    if sliding_window is not None:
        extra += f"    sliding_window: {sliding_window}\n    attention_size: {context_length}\n"
    if contexts:  # context switching, as ANEMLL's multi-context exports record it
        sizes_ = ", ".join(str(c) for c in contexts)
        extra += (f"    state_transition_infer_contexts: [{sizes_}]\n"
                  f"    state_transition_prefill_contexts: [{sizes_}]\n"
                  f"    state_transition_infer_function_template: \"infer_ctx{{context}}\"\n"
                  f"    state_transition_prefill_function_template: \"prefill_ctx{{context}}\"\n")
    extra += "    functions:\n" + "".join(f"      - {f}\n" for f in functions)
    if monolithic:
        title, summary, kind = f"{name}-ctx{context_length}-monolithic", f"Monolithic model running {name}", \
            "\n  model_type: monolithic"
        parts = f"""    lut_bits: {_yaml_lut(lut_ffn)}
    lut_embeddings: {_yaml_lut(lut_embeddings)}
    lut_lmhead: {_yaml_lut(lut_lmhead)}
    model_prefix: {prefix}
    monolithic_model: {monolithic_stem(prefix, lut_ffn)}.mlmodelc"""
    else:
        title, summary, kind = f"{name}-ctx{context_length}", f"Demonstrates running {name}", ""
        parts = f"""    lut_embeddings: {_yaml_lut(lut_embeddings)}
    lut_ffn: {_yaml_lut(lut_ffn)}
    lut_lmhead: {_yaml_lut(lut_lmhead)}
    num_chunks: {num_chunks}
    model_prefix: {prefix}
    embeddings: {embeddings_stem(prefix, lut_embeddings)}.mlmodelc
    lm_head: {lm_head_stem(prefix, lut_lmhead)}.mlmodelc
    ffn: {ffn_stem(prefix, lut_ffn, 0, num_chunks)}.mlmodelc"""
    chunks = "" if monolithic else f"\n    Chunks: {num_chunks}"
    return f"""model_info:
  name: anemll-{title}
  version: {ANEMLL_VERSION}
  description: |
    {summary} on Apple Neural Engine
    Context length: {context_length}
    Batch size: {batch_size}{chunks}
    Converted by anemll_fast from {source}
  license: MIT
  author: anemll_fast
  framework: Core ML
  language: Python
  architecture: {arch}{kind}
  parameters:
    context_length: {context_length}
    state_length: {state_length}
    batch_size: {batch_size}
{parts}
    split_lm_head: {split_lm_head}
    vocab_size: {vocab_size}
    lm_head_chunk_sizes: [{sizes}]
    argmax_in_model: {"true" if argmax_in_model else "false"}
{extra}"""


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
