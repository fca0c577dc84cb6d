"""Exceptions of the MIL interpreter: each names the file, function, op or tensor at fault."""
from anemll_fast.errors import AnemllError


class MilError(AnemllError):
    """Base of every error raised by anemll_fast.mil and the reference backend."""


class MilFormatError(MilError, ValueError):
    """A model file (model.mlmodel, model.mil, Manifest.json, metadata.json) is malformed."""


class WeightFileError(MilFormatError):
    """A weight blob file (weight.bin) is truncated, corrupt or referenced out of range."""


class UnsupportedOpError(MilError, NotImplementedError):
    """The program uses an op (or op variant) the interpreter does not implement."""


class MilInputError(MilError, ValueError):
    """An input given to predict() does not match the function's declared inputs."""


class StateSpecError(MilError, ValueError):
    """A state object does not match the state specification of the model it is used with."""


class MilRuntimeError(MilError, RuntimeError):
    """An op failed while the program ran (e.g. an index out of range)."""
