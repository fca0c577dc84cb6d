"""Sampling settings: one validated object mapping 1:1 to the native sampler chain.

The chain (csrc/engine/sampler.h), in order: logit bias -> repetition,
presence and frequency penalties over the last `penalty_window` tokens ->
greedy argmax when temperature is 0, else top-k -> temperature -> softmax ->
top-p -> min-p -> a draw from a seeded RNG.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

_U64 = 1 << 64
_I32_MAX = (1 << 31) - 1
# The native sampler works in float32 with int32 counts: each field's range
# (besides what makes sense) keeps it representable there.
_FLT_MIN = 1.1754943508222875e-38  # smallest normal float32
LIMIT = 1e4  # bound of temperature, penalties and biases (far past any useful value)


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off (CTRL-style: divide positive, multiply negative logits)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_window: Optional[int] = 64  # None: the whole history
    logit_bias: Dict[int, float] = field(default_factory=dict)
    seed: Optional[int] = None  # None: generate/stream_generate draw a random seed and report it (Engine alone: 0)
    logprobs: Optional[int] = None  # None: off; 0: chosen token only; n: also the n best
    # When to stop (the façade's, not the native sampler's).
    max_tokens: int = 256
    stop: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplingSettings":
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}: expected a number, got {value!r}")
            try:
                out = float(value)
            except OverflowError:
                out = math.inf
            if not math.isfinite(out):
                raise ValueError(f"{name}: must be finite, got {value!r}")
            return out

        def integer(name: str, optional: bool = False) -> Optional[int]:
            value = getattr(self, name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            return int(value)

        def within(name: str, value: Optional[float], lo: float, hi: float, shown: str) -> None:
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"{name}: must be in {shown}, got {getattr(self, name)!r}")

        within("temperature", number("temperature"), 0.0, LIMIT, f"[0, {LIMIT:g}] (0: greedy)")
        within("top_k", integer("top_k"), 0, _I32_MAX, "[0, 2**31-1] (0: off)")
        top_p = number("top_p")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1] (1: off), got {self.top_p!r}")
        within("min_p", number("min_p"), 0.0, 1.0, "[0, 1] (0: off)")
        within("repetition_penalty", number("repetition_penalty"), 1 / LIMIT, LIMIT,
               f"[{1 / LIMIT:g}, {LIMIT:g}] (1: off)")
        within("presence_penalty", number("presence_penalty"), -LIMIT, LIMIT, f"[-{LIMIT:g}, {LIMIT:g}]")
        within("frequency_penalty", number("frequency_penalty"), -LIMIT, LIMIT, f"[-{LIMIT:g}, {LIMIT:g}]")
        within("penalty_window", integer("penalty_window", optional=True), 0, _I32_MAX,
               "[0, 2**31-1] or None (whole history)")
        if not isinstance(self.logit_bias, Mapping):
            raise ValueError(f"logit_bias: expected a mapping of token id to bias, got {self.logit_bias!r}")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok <= _I32_MAX:
                raise ValueError(f"logit_bias: token id {tok!r} must be a non-negative integer")
            if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                    or not (bias == -math.inf or -LIMIT <= bias <= LIMIT)):
                raise ValueError(f"logit_bias: bias {bias!r} of token {tok} must be in [-{LIMIT:g}, {LIMIT:g}] "
                                 "or -inf (never)")
        seed = integer("seed", optional=True)
        if seed is not None and not 0 <= seed < _U64:
            raise ValueError(f"seed: must be in [0, 2**64), got {seed!r}")
        if integer("max_tokens") < 0:  # type: ignore[operator]
            raise ValueError(f"max_tokens: must be >= 0, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop: expected a list of non-empty strings, got {self.stop!r}")
        for x in self.stop:
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"stop: {x!r} holds a lone surrogate: it is not valid Unicode text") from None
        self.stop = tuple(self.stop)
        n = integer("logprobs", optional=True)
        if n is not None and not 0 <= n <= 1024:
            raise ValueError(f"logprobs: must be in [0, 1024] or None, got {n!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_native(self) -> Dict[str, Any]:
        """The dict NativeEngine.configure_sampler / NativeSampler take."""
        self.validate()
        return {
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            # A top_p below float32's range keeps only the best token, as the smallest float32 does.
            "top_p": max(float(self.top_p), _FLT_MIN),
            "min_p": float(self.min_p),
            "repetition_penalty": float(self.repetition_penalty),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "penalty_window": self.penalty_window,
            "logit_bias": {int(k): float(v) for k, v in self.logit_bias.items()},
            "seed": self.seed,
            "logprobs": self.logprobs,
        }
