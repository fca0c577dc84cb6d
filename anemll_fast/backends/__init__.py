"""Model execution backends. `reference`: the CPU MIL interpreter, runs anywhere numpy does."""
from anemll_fast.backends.reference import ReferenceBackend, ReferenceModel, ReferenceState

__all__ = ["ReferenceBackend", "ReferenceModel", "ReferenceState"]
