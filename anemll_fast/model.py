"""`anemll_fast.load`: a model ready to generate (config, tokenizer, engine)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from anemll_fast.config import ModelConfig
from anemll_fast.errors import AnemllError, ModelClosedError
from anemll_fast.gc_pause import gc_paused
from anemll_fast.tokenizer import Tokenizer

if TYPE_CHECKING:
    from anemll_fast.compute_plan import ComputePlan

log = logging.getLogger("anemll_fast")

BACKENDS = ("auto", "coreml", "coremltools", "reference")
COMPUTE_UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")


def available_backends() -> List[str]:
    """Backends this installation can run, fastest first."""
    out = []
    try:
        from anemll_fast import _native

        if _native.build_info().get("coreml_backend"):
            out.append("coreml")
    except ImportError:
        pass
    if sys.platform == "darwin":
        out.append("coremltools")
    out.append("reference")
    return out


def _pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    available = available_backends()
    if backend == "auto":
        return available[0]
    if backend not in available:
        why = "it needs macOS and a build with the CoreML backend" if backend == "coreml" else "it needs macOS"
        raise ValueError(f"backend: {backend!r} is not available here ({why}); available: {available}")
    return backend


def _backend_object(name: str, compute_units: str) -> Any:
    """What Engine takes for the named backend."""
    if name == "reference":
        return "reference"
    if name == "coremltools":
        from anemll_fast.backends import coremltools_backend

        return coremltools_backend.CoreMLToolsBackend(compute_units)
    from anemll_fast import _native

    return _native.CoreMLBackend(compute_units)


class Model:
    """A loaded model. Use as a context manager, or call close().

    One model may be shared by threads: `lock` (reentrant) serializes its use,
    each step of a generation runs under it, and generate() holds it for the
    whole generation. A generation that finds the KV cache changed by another
    one (threads, or interleaved stream_generate iterators) re-prefills what it
    needs and restores its sampler, so its tokens are those it would have
    produced alone.
    """

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer,
        *,
        backend: str,
        compute_units: str,
        sequential_prefill: bool = False,
    ) -> None:
        from anemll_fast.engine import Engine

        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.compute_units = compute_units
        self.lock = threading.RLock()
        if tokenizer.vocab_size > config.shapes.vocab_size:
            log.warning("anemll_fast: the tokenizer in %s has %d tokens, more than the model's vocab_size %d: "
                        "ids past %d are refused", tokenizer.directory, tokenizer.vocab_size,
                        config.shapes.vocab_size, config.shapes.vocab_size - 1)
        self.engine = Engine(config, _backend_object(backend, compute_units),
                             sequential_prefill=sequential_prefill, valid_vocab=self.valid_vocab)
        self.last_prefill_tokens = 0  # tokens the last generation prefilled (cache reuse shows here)
        self.owner: Any = None  # the generation whose tokens the KV cache and sampler hold

    @property
    def context_length(self) -> int:
        return self.config.shapes.context_length

    @property
    def valid_vocab(self) -> int:
        """Token ids the model may take and produce: those the tokenizer has."""
        return min(self.tokenizer.vocab_size, self.config.shapes.vocab_size)

    def live_engine(self) -> Any:
        """The engine, or ModelClosedError once close() ran (call with `lock` held)."""
        if self.engine is None:
            raise ModelClosedError(f"model: closed ({self.config.model_dir}); load it again to generate")
        return self.engine

    def encode(self, prompt: Union[str, Sequence[int]]) -> List[int]:
        """Token ids of a text prompt (as is, no chat template), or checked ids."""
        if isinstance(prompt, str):
            # Text from a chat template already starts with the BOS (as mlx-lm, no second one).
            bos = self.tokenizer.bos_token
            ids = self.tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))
            if not ids:
                raise ValueError("prompt: encodes to no tokens")
            return ids
        return check_token_ids(prompt, self.valid_vocab, "prompt")

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        enable_thinking: Optional[bool] = None, tools: Optional[Sequence[Mapping[str, Any]]] = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text of OpenAI-style chat `messages` (content strings, text parts, or None
        with tool_calls), with `tools` and any extra template variables (see
        Tokenizer.apply_chat_template, the one implementation)."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False,
            enable_thinking=enable_thinking, tools=tools, **template_kwargs)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, enable_thinking: Optional[bool] = None,
             **settings: Any) -> str:
        """The assistant's reply to `messages` (rendered with the model's template)."""
        from anemll_fast.generate import generate

        text = self.apply_chat_template(messages, enable_thinking=enable_thinking)
        return generate(self, self.tokenizer.encode(text, add_special_tokens=False), **settings)

    def compute_plan(self) -> "ComputePlan":
        """Where Core ML would run each part and function under this model's compute units (MLComputePlan,
        macOS 14.4+; ComputePlanUnavailable elsewhere): operations and estimated cost per device."""
        from anemll_fast.compute_plan import compute_plan

        return compute_plan(self.config, self.compute_units)

    def close(self) -> None:
        """Release the engine (waits for a step running in another thread)."""
        with self.lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None  # type: ignore[assignment]
                self.owner = None

    def __iter__(self) -> Iterator[Any]:
        """`model, tokenizer = anemll_fast.load(...)`, as with mlx-lm."""
        return iter((self, self.tokenizer))

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({str(self.config.model_dir)!r}, backend={self.backend!r})"


def check_token_ids(ids: Any, vocab: int, what: str = "prompt") -> List[int]:
    """`ids` as a list of ints in [0, vocab): integers only (no floats, strings,
    bools or bytes, which int() would silently turn into ids)."""
    import numpy as np

    if isinstance(ids, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what}: got {type(ids).__name__}; pass text as str or token ids as a list of int")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence of token ids, got an array of shape {ids.shape}")
    try:
        items = list(ids)
    except TypeError:
        raise ValueError(f"{what}: expected a string or a sequence of token ids, got {type(ids).__name__}") from None
    if not items:
        raise ValueError(f"{what}: empty")
    out = []
    for k, i in enumerate(items):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{what}: item {k} is {i!r} ({type(i).__name__}), not an integer token id")
        if not 0 <= i < vocab:
            raise ValueError(f"{what}: token id {int(i)} at index {k} is outside the vocabulary (0..{vocab - 1})")
        out.append(int(i))
    return out


def _config_for(path_or_repo: Union[str, os.PathLike, None], overrides: Optional[Dict[str, str]]) -> ModelConfig:
    from anemll_fast.anemll_dir import config_from_anemll_dir
    from anemll_fast.default_model import default_model_dir
    from anemll_fast.hub import resolve

    if path_or_repo is None:
        return config_from_anemll_dir(default_model_dir(), overrides=overrides)
    text = os.fspath(path_or_repo)
    if text.endswith(".json") and Path(text).is_file():
        return ModelConfig.from_json(text).validate()
    if Path(text).name == "meta.yaml" and Path(text).is_file():
        return config_from_anemll_dir(Path(text).parent, overrides=overrides)
    return config_from_anemll_dir(resolve(text), overrides=overrides)


def load(
    path_or_repo: Union[str, os.PathLike, None] = None,
    backend: str = "auto",
    compute_units: str = "cpu_and_ne",
    *,
    tokenizer: Union[str, os.PathLike, None] = None,
    sequential_prefill: bool = False,
    parts: Optional[Dict[str, str]] = None,
    check_placement: bool = True,
) -> Model:
    """Load a model: a local ANEMLL directory (or its meta.yaml), a Hugging
    Face repo id, or a ModelConfig JSON; None is the embedded default
    (SmolLM2-135M-Instruct). `backend`: auto, coreml, coremltools, reference.
    `parts` overrides the part names meta.yaml gives (embeddings, ffn, lm_head).
    With the coreml backend under cpu_and_ne, a PlacementWarning names every part whose estimated cost
    Core ML plans mostly off the Neural Engine (MLComputePlan, macOS 14.4+; `check_placement=False` skips it).
    """
    if compute_units not in COMPUTE_UNITS:
        raise ValueError(f"compute_units: expected one of {COMPUTE_UNITS}, got {compute_units!r}")
    chosen = _pick_backend(backend)
    with gc_paused(freeze=True):  # the programs and plans are ~10^5 long-lived objects, no garbage
        config = _config_for(path_or_repo, parts)
        tok_dir = Path(tokenizer) if tokenizer is not None else config.model_dir
        if tok_dir is None:
            raise AnemllError("no tokenizer directory: pass tokenizer=...")
        tok = Tokenizer(tok_dir)
        if backend == "auto":
            log.info("anemll_fast: backend %r picked (available: %s)", chosen, available_backends())
        model = Model(config, tok, backend=chosen, compute_units=compute_units,
                      sequential_prefill=sequential_prefill)
    if check_placement and chosen == "coreml" and compute_units == "cpu_and_ne":
        _warn_off_neural_engine(model)
    return model


def _warn_off_neural_engine(model: Model) -> None:
    from anemll_fast.compute_plan import ComputePlanUnavailable, PlacementWarning, placement_warnings

    try:
        plan = model.compute_plan()
    except ComputePlanUnavailable as exc:  # e.g. macOS before 14.4: placement is unknown, not wrong
        log.debug("anemll_fast: no compute plan: %s", exc)
        return
    for message in placement_warnings(plan):
        warnings.warn(message, PlacementWarning, stacklevel=3)
