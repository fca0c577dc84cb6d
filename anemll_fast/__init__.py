"""anemll_fast: run ANEMLL (Apple Neural Engine) LLMs fast, with a native loop."""
import logging as _logging
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING

from anemll_fast.errors import AnemllError, ConfigError, HubError, ModelClosedError

# Imported eagerly: the module `anemll_fast.generate` would otherwise shadow the
# function of the same name once something imports the module.
from anemll_fast.generate import GenerationResponse, generate, stream_generate  # noqa: E402

__version__ = "0.1.0"


class _NoNativeProxyNoise(_logging.Filter):
    """coremltools warns at import that its Core ML bridge is missing, which is
    expected off macOS (it is only needed to predict, and we do not use it there)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load _ML")


if _sys.platform != "darwin":
    _logging.getLogger("coremltools").addFilter(_NoNativeProxyNoise())


# Public names and the module each lives in; modules load on first use, so
# `import anemll_fast` stays cheap (coremltools takes seconds to import).
_LAZY = {
    "ModelConfig": "config", "ComponentConfig": "config", "TensorSpec": "config", "Shapes": "config",
    "load": "model", "Model": "model",
    "ChatSession": "chat",
    "SamplingSettings": "sampling",
    "make_sampler": "sample_utils", "make_logits_processors": "sample_utils",
    "save_prompt_cache": "prompt_cache", "load_prompt_cache": "prompt_cache",
    "Tokenizer": "tokenizer",
    "Engine": "engine", "EngineError": "engine", "EngineInputError": "engine",
    "patch_coremltools": "coreml_compat",
    "hub": None,
}


if _TYPE_CHECKING:  # type checkers and IDEs see the real objects and signatures
    from anemll_fast import hub
    from anemll_fast.chat import ChatSession
    from anemll_fast.config import ComponentConfig, ModelConfig, Shapes, TensorSpec
    from anemll_fast.coreml_compat import patch_coremltools
    from anemll_fast.engine import Engine, EngineError, EngineInputError
    from anemll_fast.model import Model, load
    from anemll_fast.prompt_cache import load_prompt_cache, save_prompt_cache
    from anemll_fast.sample_utils import make_logits_processors, make_sampler
    from anemll_fast.sampling import SamplingSettings
    from anemll_fast.tokenizer import Tokenizer


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'anemll_fast' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f"anemll_fast.{name}")
    return getattr(importlib.import_module(f"anemll_fast.{module}"), name)


__all__ = ["AnemllError", "ConfigError", "GenerationResponse", "HubError", "ModelClosedError", "__version__",
           "generate",
           "stream_generate"] + [n for n in _LAZY if n != "hub"]
