"""generate / stream_generate: text in, text out, the loop in the native engine."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from anemll_fast.detokenizer import StreamingDetokenizer
from anemll_fast.sampling import SamplingSettings

Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResponse:
    """One step of a streamed generation.

    Every response carries one generated token, except the last one, which
    has `token=None`, the text still held back (if any) and `finish_reason`
    ("stop", "length" or "context").
    """

    text: str
    token: Optional[int]
    logprobs: Optional[Tuple[float, List[Tuple[int, float]]]]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds from the call to the first token
    peak_memory: float  # MB, this process
    finish_reason: Optional[str] = None
    prefill_tokens: int = 0  # prompt tokens not found in the KV cache


def peak_memory_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def settings_from(settings: Optional[SamplingSettings], kwargs: Dict[str, Any]) -> SamplingSettings:
    """One validated SamplingSettings from an object or keywords (not both)."""
    if settings is not None and kwargs:
        raise TypeError("pass either a SamplingSettings or sampling keywords, not both")
    if settings is None:
        names = set(SamplingSettings.__dataclass_fields__)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(unknown)}")
        settings = SamplingSettings(**kwargs)
    return settings.validate()


def stream_tokens(
    model: Any, ids: List[int], settings: SamplingSettings, *, context_shift: bool = False,
    constraint: Any = None,
) -> Iterator[GenerationResponse]:
    """Stream the continuation of prompt ids (the KV cache's common prefix is reused).
    `constraint`: a grammar (anemll_fast.grammar.Grammar) masking every step natively."""
    engine = model.engine
    tok = model.tokenizer
    if engine is None:
        raise ValueError("model: closed")
    ctx = model.context_length
    if len(ids) > ctx:
        raise ValueError(f"prompt: {len(ids)} tokens do not fit the context length {ctx}")
    engine.set_sampling(settings)
    stop_ids = sorted(tok.eos_token_ids)
    detok = StreamingDetokenizer(lambda t: tok.decode(t, skip_special_tokens=True), settings.stop)
    # Positions whose tokens are already in the KV cache are not prefilled again.
    start = engine.cached_prefix(ids)
    model.last_prefill_tokens = len(ids) - start
    t0 = time.perf_counter()
    ttft = 0.0
    generated = 0
    gen_start = t0
    finish: Optional[str] = None
    want_logprobs = settings.logprobs is not None
    history = list(ids)
    budget = settings.max_tokens

    def response(text: str, token: Optional[int], logprobs: Any, finish_reason: Optional[str]) -> GenerationResponse:
        now = time.perf_counter()
        gen_time = now - gen_start
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs,
            prompt_tokens=len(ids), prompt_tps=(len(ids) - start) / ttft if ttft > 0 else 0.0,
            generation_tokens=generated,
            generation_tps=(generated - 1) / gen_time if generated > 1 and gen_time > 0 else 0.0,
            ttft=ttft, peak_memory=peak_memory_mb(), finish_reason=finish_reason,
            prefill_tokens=len(ids) - start,
        )

    feed = ids
    feed_start: Optional[int] = start
    while True:
        stream = engine.generate_tokens(feed, budget - generated, start=feed_start, stop_ids=stop_ids,
                                        constraint=constraint)
        for token in stream:
            generated += 1
            if generated == 1:
                ttft = time.perf_counter() - t0
                gen_start = time.perf_counter()
            logprobs = engine.last_logprobs() if want_logprobs else None
            if token in tok.eos_token_ids:
                finish = "stop"
                break
            history.append(token)
            text = detok.add(token)
            if detok.stopped is not None:
                finish = "stop"
                yield response(text, token, logprobs, None)
                break
            yield response(text, token, logprobs, None)
        else:
            finish = engine.finish_reason
        if finish == "context" and context_shift and generated < budget:
            # As ANEMLL's chat_full.py: keep the most recent half of the window and go on.
            keep = history[-(ctx // 2):]
            engine.reset()
            feed, feed_start = keep, 0
            model.last_prefill_tokens += len(keep)
            continue
        break
    # Close the engine's generator so that its cache length is final.
    yield response(detok.finish(), None, None, finish or "length")


def stream_generate(model: Any, prompt: Prompt, settings: Optional[SamplingSettings] = None, *,
                    context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None,
                    **kwargs: Any) -> Iterator[GenerationResponse]:
    """Stream the continuation of `prompt` (text as is, or token ids).

    Sampling settings come as a SamplingSettings or as keywords (temperature,
    top_k, top_p, min_p, repetition_penalty, presence_penalty,
    frequency_penalty, penalty_window, logit_bias, seed, logprobs,
    max_tokens, stop). With `context_shift`, a full context keeps its most
    recent half and generation continues; otherwise it ends with
    finish_reason "context". `response_format` is OpenAI's:
    {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
    constrain the output with a grammar (needs llguidance).
    """
    s = settings_from(settings, kwargs)
    ids = model.encode(prompt)
    grammar = None
    if response_format is not None:
        from anemll_fast.grammar import Grammar

        grammar = Grammar.from_response_format(model.tokenizer, response_format)
    return stream_tokens(model, ids, s, context_shift=context_shift, constraint=grammar)


def generate(model: Any, prompt: Prompt, settings: Optional[SamplingSettings] = None, *,
             context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None, **kwargs: Any) -> str:
    """The text generated after `prompt` (see stream_generate)."""
    return "".join(r.text for r in stream_generate(model, prompt, settings, context_shift=context_shift,
                                                   response_format=response_format, **kwargs))
