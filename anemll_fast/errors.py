"""Exceptions raised by anemll_fast: each names the culprit in its message."""


class AnemllError(Exception):
    """Base class of every error anemll_fast raises on purpose."""


class ConfigError(AnemllError, ValueError):
    """A model description (ModelConfig, meta.yaml, model file I/O) is wrong."""


class HubError(AnemllError):
    """A model could not be resolved, downloaded or unpacked."""


class ModelClosedError(AnemllError, ValueError):
    """The model was closed (a generation suspended meanwhile cannot go on)."""
