"""The native generation engine at the token-id level.

`Engine(config, backend)` builds the C++ pipeline (anemll_fast._native) from a
ModelConfig: embeddings, FFN chunks, LM head and sampler, with every buffer
allocated and bound once. Text, tokenizers and chat live in the façade above.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from anemll_fast.config import ComponentConfig, ModelConfig
from anemll_fast.errors import AnemllError, ConfigError
from anemll_fast.sampling import SamplingSettings


# anemll_dtype codes (csrc/backends/backend_abi.h) -> numpy
_NP_DTYPES = {1: np.float16, 2: np.float32, 3: np.float64, 4: np.int32, 5: np.int16, 6: np.int8, 7: np.uint8,
              8: np.bool_}


class EngineError(AnemllError):
    """The engine or its backend failed (the engine stays usable)."""


class EngineInputError(EngineError, ValueError):
    """A bad argument: token id outside the vocabulary, position past the context..."""


def _native():
    try:
        from anemll_fast import _native
    except ImportError as exc:  # pragma: no cover - only without a build
        raise EngineError(
            "the native extension anemll_fast._native is not built "
            "(run `python setup.py build_ext --inplace`)"
        ) from exc
    return _native


def _component(config: ModelConfig, label: str, comp: ComponentConfig) -> Dict[str, Any]:
    def specs(d):
        return [(s.name, s.data_type, [list(x) for x in s.all_shapes]) for s in d.values()]

    return {
        "label": label,
        "path": str(config.path_of(comp)),
        "function": comp.function or "",
        "inputs": specs(comp.inputs),
        "outputs": specs(comp.outputs),
        "states": specs(comp.states),
    }


def pipeline_desc(config: ModelConfig, sequential_prefill: bool = False,
                  valid_vocab: Optional[int] = None) -> Dict[str, Any]:
    """The plain description NativeEngine takes, from a validated ModelConfig.
    `valid_vocab`: ids the tokenizer has (the rest of the LM head is masked natively)."""
    config.validate(check_files=False)

    def chunks(role: str) -> List[Dict[str, Any]]:
        comps = getattr(config, role)
        return [_component(config, role if len(comps) == 1 else f"{role}[{i}]", c) for i, c in enumerate(comps)]

    s = config.shapes
    desc = {
        "batch_size": s.batch_size,
        "context_length": s.context_length,
        "hidden_size": s.hidden_size,
        "vocab_size": s.vocab_size,
        "monolithic": config.monolithic,
        "ffn_prefill": chunks("ffn_prefill"),
        "ffn_infer": chunks("ffn_infer"),
        "ffn_infer_rotate": chunks("ffn_infer_rotate"),
        "sliding_window": config.sliding_window or 0,
        "logits_outputs": [] if config.argmax_in_model else list(config.logits_outputs),
        "part_sizes": list(config.lm_head_chunk_sizes) if config.argmax_in_model else [],
        "sequential_prefill": bool(sequential_prefill) or not prefill_writes_at_position(config),
        "valid_vocab": int(valid_vocab or 0),
    }
    desc["smaller_contexts"] = [
        {"context_length": n,
         **{role: [_component(config, f"{role}@{n}" if len(chunks) == 1 else f"{role}@{n}[{i}]", c)
                   for i, c in enumerate(chunks)] for role, chunks in roles.items()}}
        for n, roles in config.context_functions.items()]
    if not config.monolithic:
        desc["embeddings"] = _component(config, "embeddings", config.embeddings)  # type: ignore[arg-type]
        desc["lm_head"] = _component(config, "lm_head", config.lm_head)  # type: ignore[arg-type]
    return desc


def prefill_writes_at_position(config: ModelConfig) -> bool:
    """Whether the prefill function writes the KV cache at current_pos, so that batches may start anywhere.

    ANEMLL 0.3.5's monolithic and sliding-window (Gemma 3) prefill functions write their local cache at fixed
    slots unless meta.yaml says `update_mask_prefill` or `prefill_dynamic_slice`; chat.py then feeds the prompt
    one token at a time through infer, and so do we. Chunked Llama/Qwen prefill always writes at current_pos.
    """
    if not (config.monolithic or config.model_info.get("sliding_window") is not None):
        return True
    return any(str(config.model_info.get(k, "")).lower() in ("true", "1", "yes")
               for k in ("update_mask_prefill", "prefill_dynamic_slice"))


BackendLike = Union[str, Any]


class TokenConstraint(Protocol):
    """What constrains a generation token by token (anemll_fast.grammar.Grammar is one).

    `mask` is a bitmask of allowed tokens (bit t%32 of word t//32) over `n_bits`
    tokens; the native sampler reads it in place at every step, so `fill_mask()`
    rewrites it before each step and `accept(token)` advances after it.
    """

    mask: np.ndarray
    n_bits: int

    def fill_mask(self) -> None: ...

    def accept(self, token: int) -> None: ...


def make_backend(backend: BackendLike):
    """A native backend handle: "null", "reference", a Python backend object
    (with `load(path, function_name)`), or an existing native backend."""
    native = _native()
    if isinstance(backend, native.Backend):
        return backend
    if backend == "null":
        return native.NullBackend()
    if backend == "reference":
        from anemll_fast.backends import reference

        return native.CallbackBackend(reference)
    if isinstance(backend, str):
        raise ValueError(f"backend: unknown backend {backend!r} (known: 'null', 'reference', or a backend object)")
    if not callable(getattr(backend, "load", None)):
        raise ValueError(f"backend: {backend!r} has no load(path, function_name) method")
    return native.CallbackBackend(backend)


class Engine:
    """Runs one model natively: prefill, decode steps, sampling, KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        backend: BackendLike = "reference",
        *,
        sequential_prefill: bool = False,
        sampling: Optional[SamplingSettings] = None,
        valid_vocab: Optional[int] = None,
    ) -> None:
        """`valid_vocab`: how many ids the tokenizer has, when fewer than the LM
        head's vocab_size (real Qwen3: 151,669 of 151,936); ids past it are
        never sampled and refused as input."""
        self.config = config
        self.context_length = config.shapes.context_length
        self.vocab_size = config.shapes.vocab_size
        if valid_vocab is not None and (isinstance(valid_vocab, bool) or not isinstance(valid_vocab, int)
                                        or not 0 < valid_vocab):
            raise ValueError(f"valid_vocab: expected a positive integer, got {valid_vocab!r}")
        if valid_vocab is not None and valid_vocab > self.vocab_size:
            raise ConfigError(
                f"tokenizer: it has {valid_vocab} tokens but the model's vocab_size is only {self.vocab_size} "
                f"({config.model_dir}): the tokenizer belongs to another model")
        self.valid_vocab = valid_vocab or self.vocab_size
        self._backend = make_backend(backend)
        self._eng = _native().NativeEngine(pipeline_desc(config, sequential_prefill, valid_vocab), self._backend)
        self.sampling = SamplingSettings()
        self.finish_reason: Optional[str] = None
        if sampling is not None:
            self.set_sampling(sampling)

    # ------------------------------------------------------------ low level
    def set_sampling(self, sampling: Optional[SamplingSettings] = None, **kwargs: Any) -> None:
        """Configure the native sampler (a SamplingSettings, or its fields as keywords)."""
        if sampling is None:
            sampling = SamplingSettings(**kwargs)
        elif kwargs:
            raise TypeError("set_sampling: pass either a SamplingSettings or keywords, not both")
        bad = [t for t in sampling.logit_bias if t >= self.valid_vocab]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {self.valid_vocab})")
        self._eng.configure_sampler(sampling.to_native())
        self.sampling = sampling

    @property
    def rng_state(self) -> bytes:
        """The sampler's random stream position (restore with set_rng_state)."""
        return self._eng.sampler_rng_state()

    def set_rng_state(self, state: bytes) -> None:
        self._eng.set_sampler_rng_state(state)

    def set_token_mask(self, words: Optional[np.ndarray], n_bits: int = -1) -> None:
        """Allow only tokens whose bit is set in `words` (uint32/int32, bit t%32 of word
        t//32) from the next step on, read in place at every step; tokens at or past
        `n_bits` are never sampled. None removes the mask."""
        self._eng.set_token_mask(words, n_bits)

    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        self._eng.reset()

    def prefill(self, tokens: Sequence[int], start: int = 0, *, one_by_one: bool = False) -> None:
        """Write the KV cache for `tokens` at positions start, start+1, ... (start <= length).
        `one_by_one`: feed them through infer as decode steps do (their exact numerics)."""
        self._eng.prefill(self._ids(tokens, "tokens"), int(start), bool(one_by_one))

    def step(self, token: int, pos: int) -> int:
        """Feed `token` at position `pos` (<= length) and return the sampled next token."""
        return self._eng.step(int(token), int(pos))

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._eng.length

    @property
    def history(self) -> np.ndarray:
        """The token ids held in the KV cache, in order."""
        return self._eng.history

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` are already in the KV cache."""
        hist = self.history
        ids = np.asarray(tokens, dtype=np.int64)
        n = min(len(hist), len(ids))
        diff = np.nonzero(hist[:n] != ids[:n])[0]
        return int(diff[0]) if diff.size else n

    def logits(self) -> np.ndarray:
        """A copy of the last step's logits (all parts, concatenated)."""
        return self._eng.logits()

    def last_logprobs(self) -> Tuple[float, List[Tuple[int, float]]]:
        return self._eng.last_logprobs()

    @property
    def prefill_mode(self) -> str:
        """'batch', 'sequential' (prefill function, one token), or 'infer' (infer only)."""
        return self._eng.prefill_mode

    @property
    def counters(self) -> Dict[str, int]:
        """Backend predictions so far, by kind (embed, prefill, infer, head)."""
        return self._eng.counters

    @property
    def state_count(self) -> int:
        return self._eng.state_count

    def function_at(self, pos: int) -> Tuple[str, bool, int]:
        """The FFN function one token at `pos` runs through ("infer" or "infer_rotate"), whether a prefill
        batch may start at `pos`, and the context size whose functions serve it (from the current size up)."""
        return self._eng.function_at(int(pos))

    @property
    def schedule_counters(self) -> Dict[str, int]:
        """infer_rotate calls, rebuilds of a rotated sliding-window cache after a rewind, context switches."""
        return self._eng.schedule_counters

    @property
    def active_context(self) -> int:
        """The context size whose functions run now (context switching models start at the smallest)."""
        return self._eng.active_context
    # ------------------------------------------------------ KV-cache state
    def state_specs(self) -> List[Tuple[int, str, str, Tuple[int, ...]]]:
        """(state index, name, numpy dtype, shape) of every KV-cache state tensor."""
        return [(i, name, np.dtype(_NP_DTYPES[code]).name, tuple(shape))
                for i, name, code, shape, _n in self._eng.state_tensors()]

    def read_states(self) -> List[np.ndarray]:
        """A copy of every KV-cache state tensor (order of state_specs)."""
        out = []
        for k, (_i, _name, code, shape, _n) in enumerate(self._eng.state_tensors()):
            arr = np.empty(shape, dtype=_NP_DTYPES[code])
            self._eng.read_state(k, arr)
            out.append(arr)
        return out

    def write_states(self, arrays: Sequence[np.ndarray], history: Sequence[int],
                     active_context: Optional[int] = None) -> None:
        """Restore every state tensor (order of state_specs) and declare the
        tokens the restored cache holds. A model with functions per context size holds one set of
        states per size: `active_context` (active_context when they were read) says whose hold the
        cache. On failure the cache holds nothing."""
        specs = self._eng.state_tensors()
        if len(arrays) != len(specs):
            raise EngineInputError(f"states: {len(arrays)} arrays for {len(specs)} state tensors")
        for k, ((_i, name, code, shape, _n), arr) in enumerate(zip(specs, arrays)):
            arr = np.asarray(arr)
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(_NP_DTYPES[code]):
                raise EngineInputError(f"state {name!r}: expected {np.dtype(_NP_DTYPES[code]).name} "
                                       f"{list(shape)}, got {arr.dtype.name} {list(arr.shape)}")
        if active_context is not None and len(history) > active_context:
            raise EngineInputError(f"history: {len(history)} tokens do not fit the active context size "
                                   f"{active_context}")
        try:
            for k, arr in enumerate(arrays):
                self._eng.write_state(k, np.asarray(arr))
            if active_context is not None:
                self._eng.set_active_context(int(active_context))
        except BaseException:
            self._eng.reset()
            raise
        self._eng.set_history(self._ids(history, "history"))

    # ----------------------------------------------------------- generation
    def generate_tokens(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        start: Optional[int] = None,
        stop_ids: Sequence[int] = (),
        constraint: Optional[TokenConstraint] = None,
    ) -> Iterator[int]:
        """Yield up to `max_new_tokens` tokens following `prompt`.

        `start`: positions already cached (default: the longest cached common
        prefix of `prompt`), so a continuation prefills only the new tokens.
        `constraint` (a grammar) masks every step's tokens natively and is told
        each token chosen. Sets `finish_reason` to "stop", "length" or
        "context" when done.
        """
        ids = self._ids(prompt, "prompt")
        n = len(ids)
        if n == 0:
            raise EngineInputError("prompt: empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be a non-negative integer, got {max_new_tokens!r}")
        if n > self.context_length:
            raise EngineInputError(
                f"prompt: {n} tokens do not fit the context length {self.context_length}"
            )
        if start is None:
            start = self.cached_prefix(ids)
        if not 0 <= start <= min(n, self.length):
            raise EngineInputError(f"start: {start} is not in [0, min(len(prompt), cached length {self.length})]")
        self.finish_reason = None
        stops = {int(t) for t in stop_ids}
        if max_new_tokens == 0:
            if start < n:
                self.prefill(ids[start:], start)
            self.finish_reason = "length"
            return
        # ANEMLL models produce the first token from infer on the last prompt position, so that position is
        # fed once, by step, not by prefill and again by step (chat.py's double feed shifts a sliding-window
        # cache twice).
        if start < n - 1:
            self.prefill(ids[start:n - 1], start)
        if constraint is None:
            yield from self._decode(ids, max_new_tokens, stops, None)
            return
        self.set_token_mask(constraint.mask, constraint.n_bits)
        try:
            yield from self._decode(ids, max_new_tokens, stops, constraint)
        finally:
            if self._eng is not None:
                self.set_token_mask(None)

    def _decode(self, ids: np.ndarray, max_new_tokens: int, stops: set,
                constraint: Optional[TokenConstraint]) -> Iterator[int]:
        n = len(ids)
        # ANEMLL models produce the first token from infer on the last prompt position.
        if constraint is not None:
            constraint.fill_mask()
        token = self.step(int(ids[-1]), n - 1)
        pos = n
        produced = 1
        while True:
            if constraint is not None:
                constraint.accept(token)
            yield token
            if token in stops:
                self.finish_reason = "stop"
                return
            if produced >= max_new_tokens:
                self.finish_reason = "length"
                return
            if pos >= self.context_length:
                self.finish_reason = "context"
                return
            if constraint is not None:
                constraint.fill_mask()
            token = self.step(token, pos)
            pos += 1
            produced += 1

    def generate(self, prompt: Sequence[int], max_new_tokens: int, **kwargs: Any) -> List[int]:
        """All tokens of generate_tokens as a list."""
        return list(self.generate_tokens(prompt, max_new_tokens, **kwargs))

    def close(self) -> None:
        """Release the native pipeline and backend resources."""
        self._eng = None  # type: ignore[assignment]
        self._backend = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _ids(self, tokens: Sequence[int], what: str) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise EngineInputError(f"{what}: expected a 1-D sequence of integer token ids")
        bad = np.nonzero((arr < 0) | (arr >= self.valid_vocab))[0]
        if bad.size:
            i = int(bad[0])
            raise EngineInputError(
                f"{what}: token id {int(arr[i])} at index {i} is outside the vocabulary [0, {self.valid_vocab})"
                + (" (the tokenizer's; the model's LM head pads to "
                   f"{self.vocab_size})" if self.valid_vocab < self.vocab_size else "")
            )
        return arr.astype(np.int32, copy=False)
