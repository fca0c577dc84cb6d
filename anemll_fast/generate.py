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


class _Turn:
    """One generation's claim on a shared model: what its KV cache and sampler must hold."""

    def __init__(self, settings: SamplingSettings, prompt_end: int) -> None:
        self.settings = settings
        self.rng_state: Optional[bytes] = None  # saved when another generation takes over
        # Positions before prompt_end were prefilled; later ones were fed by decode steps.
        self.prompt_end = prompt_end


def _claim(model: Any, turn: _Turn, history: List[int], pos: int) -> None:
    """Make the engine hold `turn`'s sampler and its KV cache for history[:pos]
    (with model.lock held)."""
    engine = model.live_engine()
    if model.owner is turn and engine.length == pos:
        return  # nobody else ran since this generation's last step
    if model.owner is not turn:
        prev = model.owner
        if prev is not None:
            prev.rng_state = engine.rng_state
        engine.set_sampling(turn.settings)
        if turn.rng_state is not None:
            engine.set_rng_state(turn.rng_state)
        model.owner = turn
    # Rebuild the cache as it was first written: a batch prefill and a decode
    # step differ in the last bits, which can flip a sampled token. So the prompt
    # part is prefilled again, and generated tokens are fed one by one.
    start = min(engine.cached_prefix(history[:pos]), turn.prompt_end)
    if start < min(turn.prompt_end, pos):
        engine.prefill(history[start:turn.prompt_end], start)
        start = turn.prompt_end
    if start < pos:
        engine.prefill(history[start:pos], start, one_by_one=True)


def stream_tokens(
    model: Any, ids: List[int], settings: SamplingSettings, *, context_shift: bool = False,
    constraint: Any = None,
) -> Iterator[GenerationResponse]:
    """Stream the continuation of prompt ids (the KV cache's common prefix is reused).

    Each step runs under model.lock; a generation resumed after another one
    used the model (another thread, or another suspended iterator) re-prefills
    its tokens and restores its random stream, so it yields what it would have
    alone. After model.close(), resuming raises ModelClosedError.
    `constraint`: a grammar (anemll_fast.grammar.Grammar) masking every step natively;
    the mask is set for this generation's own steps only.
    """
    tok = model.tokenizer
    ctx = model.context_length
    if len(ids) > ctx:
        raise ValueError(f"prompt: {len(ids)} tokens do not fit the context length {ctx}")
    turn = _Turn(settings, len(ids) - 1)
    stop_ids = tok.eos_token_ids
    detok = StreamingDetokenizer(lambda t: tok.decode(t, skip_special_tokens=True), settings.stop)
    t0 = time.perf_counter()
    ttft = 0.0
    generated = 0
    gen_start = t0
    finish: Optional[str] = None
    want_logprobs = settings.logprobs is not None
    history = list(ids)
    budget = settings.max_tokens
    with model.lock:
        # Positions whose tokens are already in the KV cache are not prefilled again.
        start = model.live_engine().cached_prefix(ids)
        model.last_prefill_tokens = len(ids) - start
        if budget == 0:
            _claim(model, turn, history, len(ids))

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

    # ANEMLL models produce the first token from infer on the last prompt position.
    pos = len(ids) - 1
    while generated < budget:
        if pos >= ctx:
            if not context_shift:
                finish = "context"
                break
            # As ANEMLL's chat_full.py: keep the most recent half of the window and go on.
            history = history[-(ctx // 2):]
            pos = turn.prompt_end = len(history) - 1
            model.last_prefill_tokens += len(history)
        with model.lock:
            _claim(model, turn, history, pos)
            engine = model.engine
            if constraint is not None:
                constraint.fill_mask()
                engine.set_token_mask(constraint.mask, constraint.n_bits)
            try:
                token = engine.step(history[pos], pos)
            finally:
                if constraint is not None:
                    engine.set_token_mask(None)
            logprobs = engine.last_logprobs() if want_logprobs else None
        if constraint is not None:
            constraint.accept(token)
        pos += 1
        generated += 1
        if generated == 1:
            ttft = time.perf_counter() - t0
            gen_start = time.perf_counter()
        if token in stop_ids:
            finish = "stop"
            break
        history.append(token)
        text = detok.add(token)
        if detok.stopped is not None:
            finish = "stop"
            yield response(text, token, logprobs, None)
            break
        yield response(text, token, logprobs, None)
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
    """The text generated after `prompt` (see stream_generate). The whole
    generation holds model.lock, so concurrent generate() calls run one after the other."""
    stream = stream_generate(model, prompt, settings, context_shift=context_shift,
                             response_format=response_format, **kwargs)
    with model.lock:
        return "".join(r.text for r in stream)
