"""Sampling settings: one validated object mapping 1:1 to the native sampler chain.

The chain (csrc/engine/sampler.h), in order: logit bias -> repetition,
presence and frequency penalties over the last `penalty_window` tokens ->
greedy argmax when temperature is 0, else top-k -> temperature -> softmax ->
top-p -> min-p -> a draw from a seeded RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

_U64 = 1 << 64


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
    seed: Optional[int] = None  # None: 0 (a fixed seed, generations reproduce)
    logprobs: Optional[int] = None  # None: off; 0: chosen token only; n: also the n best
    # When to stop (the façade's, not the native sampler's).
    max_tokens: int = 256
    stop: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplingSettings":
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: must be finite, got {value!r}")
            return float(value)

        def integer(name: str, optional: bool = False) -> Optional[int]:
            value = getattr(self, name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            return value

        if number("temperature") < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        if integer("top_k") < 0:  # type: ignore[operator]
            raise ValueError(f"top_k: must be >= 0, got {self.top_k!r}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if number("repetition_penalty") <= 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty!r}")
        number("presence_penalty")
        number("frequency_penalty")
        window = integer("penalty_window", optional=True)
        if window is not None and window < 0:
            raise ValueError(f"penalty_window: must be >= 0 or None (whole history), got {window!r}")
        if not isinstance(self.logit_bias, Mapping):
            raise ValueError(f"logit_bias: expected a mapping of token id to bias, got {self.logit_bias!r}")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias: token id {tok!r} must be a non-negative integer")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
                raise ValueError(f"logit_bias: bias {bias!r} of token {tok} must be finite or -inf")
        seed = integer("seed", optional=True)
        if seed is not None and not 0 <= seed < _U64:
            raise ValueError(f"seed: must be in [0, 2**64), got {seed!r}")
        if integer("max_tokens") < 0:  # type: ignore[operator]
            raise ValueError(f"max_tokens: must be >= 0, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop: expected a list of non-empty strings, got {self.stop!r}")
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
            "top_p": float(self.top_p),
            "min_p": float(self.min_p),
            "repetition_penalty": float(self.repetition_penalty),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "penalty_window": self.penalty_window,
            "logit_bias": {int(k): float(v) for k, v in self.logit_bias.items()},
            "seed": self.seed,
            "logprobs": self.logprobs,
        }
