"""Op implementations, grouped by family; importing this package registers them all."""
from anemll_fast.mil.ops import (  # noqa: F401
    constexpr, elementwise, indexing, linear, random, recurrent, reduction, spatial, state, tensor,
)
from anemll_fast.mil.ops.constexpr import CONSTEXPR
from anemll_fast.mil.ops.registry import OPS, BuildContext, Kernel

# Ops the interpreter knows: runtime kernels, compile-time decoders and plain constants.
SUPPORTED_OPS = frozenset(OPS) | frozenset(CONSTEXPR) | {"const"}

__all__ = ["OPS", "CONSTEXPR", "SUPPORTED_OPS", "BuildContext", "Kernel"]
