"""anemll_fast: run ANEMLL (Apple Neural Engine) LLMs fast, with a native loop."""
import logging as _logging
import sys as _sys

from anemll_fast.errors import AnemllError, ConfigError, HubError

__version__ = "0.1.0"


class _NoNativeProxyNoise(_logging.Filter):
    """coremltools warns at import that its Core ML bridge is missing, which is
    expected off macOS (it is only needed to predict, and we do not use it there)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load _ML")


if _sys.platform != "darwin":
    _logging.getLogger("coremltools").addFilter(_NoNativeProxyNoise())


def __getattr__(name: str):
    # Heavy modules load on first use, so `import anemll_fast` stays cheap.
    if name in ("ModelConfig", "ComponentConfig", "TensorSpec", "Shapes"):
        from anemll_fast import config

        return getattr(config, name)
    raise AttributeError(f"module 'anemll_fast' has no attribute {name!r}")


__all__ = [
    "AnemllError",
    "ComponentConfig",
    "ConfigError",
    "HubError",
    "ModelConfig",
    "Shapes",
    "TensorSpec",
    "__version__",
]
