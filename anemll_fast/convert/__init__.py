"""Build ANEMLL-layout Core ML models (embeddings, multifunction FFN chunks, split LM head, meta.yaml) from
random, Hugging Face or GGUF weights with coremltools' MIL builder: no PyTorch, runs on any OS."""
from anemll_fast.convert.arch import SUPPORTED_ARCHS, ArchConfig
from anemll_fast.convert.errors import ConvertError
from anemll_fast.convert.graph import OPS_USED, STATE_NAME
from anemll_fast.convert.pipeline import LoadedSource, convert, convert_random, load_source

__all__ = [
    "SUPPORTED_ARCHS", "ArchConfig", "ConvertError", "OPS_USED", "STATE_NAME", "LoadedSource", "convert",
    "convert_random", "load_source",
]
