"""generate / stream_generate: text in, text out, the loop in the native engine.

Two spellings, one implementation:
- anemll_fast's: `generate(model, prompt, temperature=..., seed=...)`,
- mlx-lm's: `generate(model, tokenizer, prompt=..., max_tokens=..., verbose=True,
  sampler=make_sampler(...), logits_processors=make_logits_processors(...))`.
"""
from __future__ import annotations

import resource
import secrets
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union, overload

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
    peak_memory: float  # GB (as mlx-lm), peak resident memory of this process
    finish_reason: Optional[str] = None
    prefill_tokens: int = 0  # prompt tokens not found in the KV cache
    seed: Optional[int] = None  # the sampler's seed: given, or drawn at random (pass it back to repeat a run)
    from_draft: bool = False  # mlx-lm's field; no speculative decoding here


def peak_memory_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return rss / 1024 ** 3 if sys.platform == "darwin" else rss / 1024 ** 2


def with_seed(settings: SamplingSettings) -> SamplingSettings:
    """The settings with a seed: a random one when none is given (as mlx-lm and
    llama-cpp-python), so that runs differ unless a seed makes them repeat."""
    if settings.seed is not None:
        return settings
    return replace(settings, seed=secrets.randbits(63))


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
        _prefill(engine, model.config.shapes.batch_size, history[start:turn.prompt_end], start)
        start = turn.prompt_end
    if start < pos:
        engine.prefill(history[start:pos], start, one_by_one=True)


def _prefill(engine: Any, batch: int, tokens: List[int], start: int) -> None:
    """Prefill `tokens` at `start`; on a terminal a long prefill runs in slices of
    whole batches (the same batches one call would run) behind a progress bar."""
    from anemll_fast import progress

    step = 2 * max(int(batch), 1)
    if len(tokens) <= step or not progress.interactive():
        engine.prefill(tokens, start)
        return
    with progress.bar(total=len(tokens), desc="prefill", unit="tok") as shown:
        for i in range(0, len(tokens), step):
            engine.prefill(tokens[i:i + step], start + i)
            shown.update(len(tokens[i:i + step]))


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
    settings = with_seed(settings)
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
            ttft=ttft, peak_memory=peak_memory_gb(), finish_reason=finish_reason,
            prefill_tokens=len(ids) - start, seed=settings.seed,
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


def _call(model: Any, tokenizer_or_prompt: Any, prompt: Any, settings: Optional[SamplingSettings],
          sampler: Any, logits_processors: Any, kwargs: Dict[str, Any]) -> Tuple[List[int], SamplingSettings]:
    """Prompt ids and settings from either spelling (see the module docstring)."""
    if isinstance(prompt, SamplingSettings) and settings is None:  # generate(model, prompt, settings)
        prompt, settings = None, prompt
    if prompt is None:
        text = tokenizer_or_prompt  # anemll_fast's: generate(model, prompt)
    elif tokenizer_or_prompt is None:
        text = prompt  # generate(model, prompt=...)
    else:  # mlx-lm's: generate(model, tokenizer, prompt)
        if tokenizer_or_prompt is not getattr(model, "tokenizer", None):
            raise ValueError("tokenizer: pass the tokenizer load() returned with this model "
                             "(model, tokenizer = anemll_fast.load(...))")
        text = prompt
    if text is None:
        raise TypeError("prompt: missing (a string or a list of token ids)")
    if sampler is not None or logits_processors:
        from anemll_fast.sample_utils import settings_from_mlx

        mlx = settings_from_mlx(sampler, logits_processors)
        clash = sorted(set(mlx) & set(kwargs))
        if clash or settings is not None:
            raise TypeError(f"pass sampling either as sampler=/logits_processors= or as "
                            f"{'keywords ' + ', '.join(clash) if clash else 'a SamplingSettings'}, not both")
        kwargs = {**kwargs, **mlx}
    return model.encode(text), settings_from(settings, kwargs)


@overload
def stream_generate(model: Any, prompt: Prompt, settings: Optional[SamplingSettings] = None, *,
                    context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None,
                    sampler: Any = None, logits_processors: Any = None,
                    **kwargs: Any) -> Iterator[GenerationResponse]: ...


@overload
def stream_generate(model: Any, tokenizer: Any, prompt: Prompt, settings: Optional[SamplingSettings] = None, *,
                    context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None,
                    sampler: Any = None, logits_processors: Any = None,
                    **kwargs: Any) -> Iterator[GenerationResponse]: ...


def stream_generate(model: Any, tokenizer_or_prompt: Any = None, prompt: Any = None,
                    settings: Optional[SamplingSettings] = None, *, context_shift: bool = False,
                    response_format: Optional[Dict[str, Any]] = None, sampler: Any = None,
                    logits_processors: Any = None, **kwargs: Any) -> Iterator[GenerationResponse]:
    """Stream the continuation of a prompt (text as is, or token ids).

    `stream_generate(model, prompt, ...)`, or as mlx-lm
    `stream_generate(model, tokenizer, prompt, ...)`. Sampling settings come
    as a SamplingSettings, as keywords (temperature, top_k, top_p, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, penalty_window,
    logit_bias, seed, logprobs, max_tokens, stop), or as mlx-lm's
    `sampler=make_sampler(...)` and `logits_processors=make_logits_processors(...)`.
    Without a seed a random one is used and reported in each response. With
    `context_shift`, a full context keeps its most recent half and generation
    continues; otherwise it ends with finish_reason "context". `response_format`
    is OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"schema": ...}} constrain the output with a grammar (needs llguidance).
    """
    ids, s = _call(model, tokenizer_or_prompt, prompt, settings, sampler, logits_processors, kwargs)
    grammar = None
    if response_format is not None:
        from anemll_fast.grammar import Grammar

        grammar = Grammar.from_response_format(model.tokenizer, response_format)
    return stream_tokens(model, ids, s, context_shift=context_shift, constraint=grammar)


@overload
def generate(model: Any, prompt: Prompt, settings: Optional[SamplingSettings] = None, *, verbose: bool = False,
             context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None, sampler: Any = None,
             logits_processors: Any = None, **kwargs: Any) -> str: ...


@overload
def generate(model: Any, tokenizer: Any, prompt: Prompt, settings: Optional[SamplingSettings] = None, *,
             verbose: bool = False, context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None,
             sampler: Any = None, logits_processors: Any = None, **kwargs: Any) -> str: ...


def generate(model: Any, tokenizer_or_prompt: Any = None, prompt: Any = None, settings: Optional[SamplingSettings] = None,
             *, verbose: bool = False, context_shift: bool = False, response_format: Optional[Dict[str, Any]] = None,
             sampler: Any = None, logits_processors: Any = None, **kwargs: Any) -> str:
    """The text generated after a prompt (see stream_generate). The whole
    generation holds model.lock, so concurrent generate() calls run one after the other.

    verbose: print the text as it comes, then prompt and generation tokens/s
    and peak memory, as mlx-lm does.
    """
    if verbose:
        print("=" * 10)
    pieces: List[str] = []
    last: Optional[GenerationResponse] = None
    stream = stream_generate(model, tokenizer_or_prompt, prompt, settings, context_shift=context_shift,
                             response_format=response_format, sampler=sampler,
                             logits_processors=logits_processors, **kwargs)
    with model.lock:  # the whole generation: concurrent generate() calls run one after the other
        for last in stream:
            pieces.append(last.text)
            if verbose:
                print(last.text, end="", flush=True)
    text = "".join(pieces)
    if verbose and last is not None:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {last.peak_memory:.3f} GB")
        print(f"Finish: {last.finish_reason}, seed: {last.seed}")
    return text
