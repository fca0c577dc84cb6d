"""The loop users run today: ANEMLL's chat.py-style Python orchestration (anemll_fast.testing.pipeline's
PythonPipeline: input dicts and mask slices built per call, one shared state) driving a backend's models.

On macOS the models are coremltools' `MLModel.predict` (the coremltools backend); elsewhere they are the
reference backend's, the same interpreter the native engine drives on that backend, so that the ratio is
the orchestration's cost alone.
"""
from __future__ import annotations

import time
from typing import Any, List, Sequence, Tuple

from anemll_fast.config import ModelConfig


def models_for(backend: str, compute_units: str) -> Any:
    """What PythonPipeline loads parts with, for the named anemll_fast backend."""
    if backend in ("coreml", "coremltools"):
        from anemll_fast.backends.coremltools_backend import CoreMLToolsBackend

        return CoreMLToolsBackend(compute_units)
    from anemll_fast.backends.reference import ReferenceBackend

    return ReferenceBackend


class ChatPyLoop:
    """Greedy generation the chat.py way: prefill the prompt, then one `infer` and one head per token."""

    def __init__(self, config: ModelConfig, backend: str = "reference", compute_units: str = "cpu_and_ne") -> None:
        from anemll_fast.testing.pipeline import PythonPipeline

        self.pipeline = PythonPipeline(config, models_for(backend, compute_units))

    def prefill(self, prompt: Sequence[int]) -> int:
        """A fresh cache, the prompt written, and the first new token."""
        self.pipeline.reset()
        return self.pipeline.token_of(self.pipeline.prefill(list(prompt)))

    def decode(self, first: int, start: int, n: int) -> List[int]:
        """n greedy tokens after `first` fed at `start`."""
        out, tok = [], first
        for pos in range(start, start + n):
            tok = self.pipeline.token_of(self.pipeline.infer(tok, pos))
            out.append(tok)
        return out

    def timed_decode(self, prompt: Sequence[int], n: int) -> Tuple[List[int], float]:
        """(first token and n more, seconds of the n decode steps) after prefilling `prompt`."""
        first = self.prefill(prompt)
        t = time.perf_counter()
        out = self.decode(first, len(prompt), n)
        return [first] + out, time.perf_counter() - t
