"""Op implementations, grouped by family; importing this package registers them all."""
from anemll_fast.mil.ops import (  # noqa: F401
    constexpr, elementwise, indexing, linear, lists, random, recurrent, reduction, spatial, state, tensor,
)
from anemll_fast.mil.ops.constexpr import CONSTEXPR
from anemll_fast.mil.ops.registry import OPS, BuildContext, Kernel

# Ops the interpreter knows: runtime kernels, compile-time decoders and plain constants.
# Control flow (cond, while_loop) is compiled by the plan itself, into sub-plans per block.
CONTROL_FLOW = frozenset({"cond", "while_loop"})
SUPPORTED_OPS = frozenset(OPS) | frozenset(CONSTEXPR) | CONTROL_FLOW | {"const"}

__all__ = ["OPS", "CONSTEXPR", "CONTROL_FLOW", "SUPPORTED_OPS", "BuildContext", "Kernel"]
