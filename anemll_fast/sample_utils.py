"""mlx-lm's sampler and logits-processor factories, mapped onto the native chain.

`make_sampler(temp=..., top_p=..., min_p=..., top_k=...)` and
`make_logits_processors(logit_bias=..., repetition_penalty=...)` take
mlx-lm's names and defaults and return objects that `generate`,
`stream_generate` and `ChatSession` accept as `sampler=` and
`logits_processors=`. They carry settings, not code: sampling runs in the
native sampler chain (see anemll_fast.sampling), so what that chain cannot do
(XTC, min_tokens_to_keep > 1, penalties over different windows, a Python
callable) is refused with an error naming it, never silently dropped.

Semantics follow mlx-lm: temp 0 is greedy; top_p 0 or 1, min_p 0 and
top_k 0 are off; penalties look at the last `*_context_size` tokens. One
difference: the native chain applies top-p and min-p after the temperature
(mlx-lm before), as llama.cpp does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence


class UnsupportedSamplingError(ValueError):
    """A sampler or logits processor the native sampler chain cannot run."""


@dataclass(frozen=True)
class Sampler:
    """What make_sampler returns: settings for the native chain."""

    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0

    def settings(self) -> Dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p, "top_k": self.top_k}

    def __call__(self, logprobs: Any) -> Any:
        raise UnsupportedSamplingError("this sampler runs inside the native engine; pass it as sampler= to "
                                       "generate / stream_generate instead of calling it")


@dataclass(frozen=True)
class LogitsProcessor:
    """One of make_logits_processors' results: a native setting and its window."""

    name: str  # logit_bias, repetition_penalty, presence_penalty, frequency_penalty
    value: Any
    context_size: Optional[int] = None

    def __call__(self, tokens: Any, logits: Any) -> Any:
        raise UnsupportedSamplingError("this logits processor runs inside the native engine; pass it as "
                                       "logits_processors= to generate / stream_generate instead of calling it")


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.0,
    xtc_special_tokens: Optional[List[int]] = None,
) -> Sampler:
    """A sampler with mlx-lm's parameters (see the module docstring)."""
    if min_tokens_to_keep != 1:
        raise UnsupportedSamplingError(f"min_tokens_to_keep={min_tokens_to_keep!r}: the native min-p keeps "
                                       "at least the most likely token only (use 1)")
    if xtc_probability:
        raise UnsupportedSamplingError(f"xtc_probability={xtc_probability!r}: XTC sampling is not in the "
                                       "native sampler chain")
    from anemll_fast.sampling import SamplingSettings

    on_p = isinstance(top_p, (int, float)) and 0.0 < top_p < 1.0
    k = top_k if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0 else 0
    s = Sampler(temperature=temp, top_p=top_p if on_p else 1.0, min_p=min_p, top_k=k)
    SamplingSettings(**s.settings())  # validated now, naming the bad field
    return s


def make_logits_processors(
    logit_bias: Optional[Dict[int, float]] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = 20,
    presence_penalty: Optional[float] = None,
    presence_context_size: Optional[int] = 20,
    frequency_penalty: Optional[float] = None,
    frequency_context_size: Optional[int] = 20,
) -> List[LogitsProcessor]:
    """Logits processors with mlx-lm's parameters (see the module docstring)."""
    out: List[LogitsProcessor] = []
    if logit_bias:
        out.append(LogitsProcessor("logit_bias", dict(logit_bias)))
    for name, value, size in (("repetition_penalty", repetition_penalty, repetition_context_size),
                              ("presence_penalty", presence_penalty, presence_context_size),
                              ("frequency_penalty", frequency_penalty, frequency_context_size)):
        if value is not None and value != 0:
            out.append(LogitsProcessor(name, value, size))
    settings_from_mlx(None, out)  # validated now
    return out


def settings_from_mlx(sampler: Any, processors: Optional[Sequence[Any]]) -> Dict[str, Any]:
    """SamplingSettings fields for a sampler and logits processors."""
    fields: Dict[str, Any] = {}
    if sampler is not None:
        if not isinstance(sampler, Sampler):
            raise UnsupportedSamplingError(
                f"sampler: {sampler!r} is not from anemll_fast.make_sampler; a Python callable cannot run in "
                "the native sampler chain")
        fields.update(sampler.settings())
    windows: Dict[str, Optional[int]] = {}
    for p in processors or ():
        if not isinstance(p, LogitsProcessor):
            raise UnsupportedSamplingError(
                f"logits_processors: {p!r} is not from anemll_fast.make_logits_processors; a Python callable "
                "cannot run in the native sampler chain")
        if p.name in fields:
            raise ValueError(f"logits_processors: {p.name} given twice")
        fields[p.name] = p.value
        if p.name != "logit_bias":
            windows[p.name] = p.context_size
    if len(set(windows.values())) > 1:
        detail = ", ".join(f"{n.replace('_penalty', '')}_context_size={w}" for n, w in windows.items())
        raise UnsupportedSamplingError(f"logits_processors: the native chain applies every penalty over one "
                                       f"window; got {detail}")
    if windows:
        fields["penalty_window"] = next(iter(windows.values()))
    if "logit_bias" in fields:
        fields["logit_bias"] = _bias(fields["logit_bias"])
    from anemll_fast.sampling import SamplingSettings

    SamplingSettings(**fields)
    return fields


def _bias(bias: Mapping[Any, Any]) -> Dict[int, float]:
    out = {}
    for k, v in bias.items():
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"logit_bias: token id {k!r} must be an integer")
        out[k] = v
    return out
