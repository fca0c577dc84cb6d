"""ANEMLL's orchestration written plainly in Python, in the style of ANEMLL's chat.py.

embeddings -> FFN chunks (prefill / infer, one KV-cache state shared by every chunk and both
functions) -> LM head. Input dicts and mask slices are built on every call, as chat.py does: this is
the baseline the native engine is checked and benchmarked against, so it stays simple, not fast.

Prefill runs batches of `batch_size` (the last one padded) while a whole batch fits in the context,
then the remaining tokens one at a time through `infer`; the first new token comes from `infer` on the
last prompt position (the last chunk's prefill returns only one hidden row).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from anemll_fast.config import ComponentConfig, ModelConfig
from anemll_fast.errors import AnemllError

# What prefill/infer return: the full-vocabulary logits of a logits head, or the token of an argmax head.
HeadResult = Union[np.ndarray, int]


class PipelineInputError(AnemllError, ValueError):
    """Bad tokens or positions given to a PythonPipeline, or a head output it cannot read."""


class PythonPipeline:
    """Runs a ModelConfig's parts through `backend.load(path, function_name)` models, which must offer
    `predict(inputs, state=None) -> dict` (and the infer chunks `make_state()`).

    `timing` accumulates seconds spent in "embeddings", "ffn" and "lm_head" predictions (callers may
    zero it between phases)."""

    def __init__(self, config: ModelConfig, backend: Any):
        self.config = config
        self.context = config.shapes.context_length
        self.batch = config.shapes.batch_size
        self.vocab_size = config.shapes.vocab_size
        if config.embeddings is None or config.lm_head is None or not config.ffn_infer:
            raise PipelineInputError(f"{config.model_dir}: the config needs embeddings, ffn_infer and lm_head")
        self._backend = backend
        self._loaded: Dict[str, Any] = {}
        self.embed = self._load(config.embeddings)
        self.prefill_fns = [self._load(c) for c in config.ffn_prefill]
        self.infer_fns = [self._load(c) for c in config.ffn_infer]
        self.head = self._load(config.lm_head)
        self.prefill_mode = config.prefill_mode if config.ffn_prefill else "infer"
        self.argmax_head = config.argmax_in_model
        self.part_sizes = self._part_sizes()
        self.state = self.infer_fns[0].make_state()  # one state for every chunk and function
        self.mask = np.triu(np.full((self.context, self.context), -np.inf, np.float16), 1)[None, None]
        self.timing: Dict[str, float] = {"embeddings": 0.0, "ffn": 0.0, "lm_head": 0.0}

    def _load(self, comp: ComponentConfig) -> Any:
        """Loads a part; a second function of an already loaded file reuses its parsed program when the
        backend's model offers `function(name)` (the reference backend does), to load each file once."""
        path = str(self.config.path_of(comp))
        first = self._loaded.get(path)
        if first is not None and hasattr(first, "function") and comp.function is not None:
            return first.function(comp.function)
        model = self._backend.load(path, comp.function)
        self._loaded.setdefault(path, model)
        return model

    def _part_sizes(self) -> List[int]:
        cfg = self.config
        if not self.argmax_head:
            return list(cfg.lm_head_chunk_sizes)
        parts = cfg.logits_parts
        sizes = list(cfg.lm_head_chunk_sizes)
        if not sizes:  # no model_info sizes: as ANEMLL 0.3.5's chat.py, the remainder goes to the first parts
            base, rem = divmod(self.vocab_size, parts)
            sizes = [base + (1 if i < rem else 0) for i in range(parts)]
        if len(sizes) != parts or sum(sizes) != self.vocab_size:
            raise PipelineInputError(f"model_info.lm_head_chunk_sizes: {sizes} do not describe {parts} parts "
                                     f"of vocab_size {self.vocab_size}")
        return sizes

    def reset(self) -> None:
        """A fresh KV cache: the state zeroed in place when it can be (as the native engine resets a
        backend's state), else a new one."""
        reset = getattr(self.state, "reset", None)
        if callable(reset):
            reset()
        else:
            self.state = self.infer_fns[0].make_state()

    # --------------------------------------------------------------- parts
    def _embed(self, ids: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        hidden = self.embed.predict({"input_ids": ids})["hidden_states"]
        self.timing["embeddings"] += time.perf_counter() - t
        return hidden

    def _chunks(self, fns: List[Any], comps: List[ComponentConfig], hidden: np.ndarray, start: int,
                width: int) -> np.ndarray:
        """Runs `width` rows at positions start.. through every chunk; rows past the tokens are padding."""
        positions = np.arange(start, start + width, dtype=np.int32)
        t = time.perf_counter()
        for fn, comp in zip(fns, comps):
            inputs = {"hidden_states": hidden, "position_ids": positions,
                      "causal_mask": self.mask[:, :, start:start + width],
                      "current_pos": np.array([start], np.int32)}
            if "update_mask" in comp.inputs:
                update = np.zeros((1, 1, self.context, width), np.float16)
                update[0, 0, positions, np.arange(width)] = 1
                inputs["update_mask"] = update
            hidden = fn.predict(inputs, self.state)["output_hidden_states"]
        self.timing["ffn"] += time.perf_counter() - t
        return hidden

    def _head(self, hidden: np.ndarray) -> HeadResult:
        t = time.perf_counter()
        out = self.head.predict({"hidden_states": hidden})
        self.timing["lm_head"] += time.perf_counter() - t
        if not self.argmax_head:
            return np.concatenate([np.asarray(out[name]).reshape(-1) for name in self.config.logits_outputs])
        idx = np.asarray(out["argmax_idx"]).reshape(-1)
        vals = np.asarray(out["argmax_val"], np.float32).reshape(-1)
        best = int(np.argmax(vals))
        if not 0 <= int(idx[best]) < self.part_sizes[best]:
            raise PipelineInputError(f"lm_head: argmax_idx[{best}] = {int(idx[best])} is outside part {best} "
                                     f"(size {self.part_sizes[best]})")
        return sum(self.part_sizes[:best]) + int(idx[best])  # argmax_idx is the index within its part

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self.context:
            raise PipelineInputError(f"position {pos} is outside the context length {self.context}")

    # --------------------------------------------------------------- API
    def infer(self, token: int, pos: int) -> HeadResult:
        """One token at `pos` through embeddings, every infer chunk and the head."""
        self._check_position(pos)
        hidden = self._embed(np.array([[token]], np.int32))
        return self._head(self._chunks(self.infer_fns, self.config.ffn_infer, hidden, pos, 1))

    def prefill(self, tokens: Sequence[int], start: int = 0) -> HeadResult:
        """Writes `tokens` to the cache at positions start.., then infers the last one again: the head's
        result for the next token (logits, or the token of an argmax head)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise PipelineInputError("prefill: no tokens")
        if start < 0 or start + len(tokens) > self.context:
            raise PipelineInputError(f"prefill: positions {start}..{start + len(tokens) - 1} do not fit the "
                                     f"context length {self.context}")
        p, end, B = start, start + len(tokens), self.batch
        while p < end:
            if self.prefill_mode == "batch" and p + B <= self.context:
                chunk = tokens[p - start:p - start + B]
                ids = np.zeros((1, B), np.int32)  # a short last batch is padded with token 0
                ids[0, :len(chunk)] = chunk
                self._chunks(self.prefill_fns, self.config.ffn_prefill, self._embed(ids), p, B)
                p += len(chunk)
            elif self.prefill_mode == "sequential":
                ids = np.array([[tokens[p - start]]], np.int32)
                self._chunks(self.prefill_fns, self.config.ffn_prefill, self._embed(ids), p, 1)
                p += 1
            else:  # a batch would pass the end of the context (or there is no prefill): infer
                ids = np.array([[tokens[p - start]]], np.int32)
                self._chunks(self.infer_fns, self.config.ffn_infer, self._embed(ids), p, 1)
                p += 1
        return self.infer(tokens[-1], end - 1)

    def token_of(self, result: HeadResult) -> int:
        """The greedy token of a prefill/infer result."""
        return result if isinstance(result, int) else int(np.argmax(result))

    def greedy_with_logits(self, prompt: Sequence[int], n: int,
                           start: int = 0) -> Tuple[List[int], List[Optional[np.ndarray]]]:
        """Up to `n` greedy tokens after `prompt` (fewer when the context ends), and the head result each
        was chosen from (logits; None for an argmax head)."""
        if n < 0:
            raise PipelineInputError(f"greedy: n must be >= 0, got {n}")
        result = self.prefill(prompt, start)
        pos = start + len(prompt)
        tokens: List[int] = []
        logits: List[Optional[np.ndarray]] = []
        while True:
            tokens.append(self.token_of(result))
            logits.append(None if isinstance(result, int) else result)
            if len(tokens) >= n or pos >= self.context:
                break
            result = self.infer(tokens[-1], pos)
            pos += 1
        return tokens[:n], logits[:n]

    def greedy(self, prompt: Sequence[int], n: int, start: int = 0) -> List[int]:
        """Up to `n` greedy tokens after `prompt` (fewer when the context ends)."""
        return self.greedy_with_logits(prompt, n, start)[0]


__all__ = ["PythonPipeline", "PipelineInputError", "HeadResult"]
