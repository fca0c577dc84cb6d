"""anemll_fast's reference backend beside external baselines on the same weights (issue #18's ratios).

For each model (the embedded default in fp16, and optionally its LUT4-FFN / LUT6-head conversion) and each
baseline side (`baselines.available`: PyTorch eager float32, llama.cpp), in interleaved rounds: prefill of a
64-token prompt (to the first new token) and decode, both in tokens/s of the thread's CPU time (every side runs
on one thread, so this is its own work whatever else the machine runs). Then each model's ratios to each
baseline per round (decode and prefill), its RSS after load in a fresh process over the size of its model
files, and whether its greedy tokens match each baseline's.

A side is anything with `prefill(prompt) -> first token` and `decode(first, start, n) -> tokens`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from anemll_fast.bench.stats import HIGHER, LOWER, Figure, interleaved

PROMPT_LEN = 64
GROUP = "against baselines"
OURS = "anemll_fast reference"


class EngineSide:
    """The native engine on the reference backend, as users run it (`anemll_fast.load`)."""

    def __init__(self, model_dir: Any) -> None:
        import anemll_fast

        self.model = anemll_fast.load(str(model_dir), backend="reference")
        self._eng = self.model.engine._eng
        self.context_length, self.vocab_size = self.model.context_length, self.model.valid_vocab

    def prefill(self, prompt: List[int]) -> int:
        """From an empty cache: the prompt but its last token, then the step giving the first new token."""
        _, _, tok = self._eng.bench_prefill(prompt, 1)
        return int(tok)

    def decode(self, first: int, start: int, n: int) -> List[int]:
        tokens, _ = self._eng.bench_decode(first, start, n)
        return [int(t) for t in tokens]

    def close(self) -> None:
        self.model.close()


def thread_seconds(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """(fn's result, CPU seconds of this thread it took)."""
    t = time.thread_time()
    out = fn()
    return out, time.thread_time() - t


def model_files_bytes(model_dir: Any) -> int:
    """Bytes of the model parts: every file inside the .mlpackage / .mlmodelc directories."""
    total = sum(f.stat().st_size for part in Path(model_dir).iterdir() if part.suffix in (".mlpackage", ".mlmodelc")
                for f in part.rglob("*") if f.is_file())
    if total == 0:
        raise ValueError(f"{model_dir}: no .mlpackage / .mlmodelc model parts there")
    return total


# What the child loads: the whole model as a user does (tokenizer and engine included), or only its parts on
# the reference backend (what the backend itself holds: the parts driven as chat.py drives them).
_RSS_LOAD = {
    "model": "side = anemll_fast.load(sys.argv[1], backend='reference')\n"
             "side.engine._eng.bench_prefill(list(range(1, 9)), 1)\n",
    "parts": "from anemll_fast.bench.chatpy_loop import ChatPyLoop\n"
             "from anemll_fast.config import ModelConfig\n"
             "side = ChatPyLoop(ModelConfig.from_anemll_dir(sys.argv[1]), 'reference')\n"
             "side.prefill(list(range(1, 9)))\n",
}
# (after one prediction of each part: lazily mapped weights in)
_RSS_CODE = """
import os, sys, resource
import anemll_fast
{load}
try:
    kb = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0]
except OSError:  # no /proc (macOS): the peak, which right after the load is the load's
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb = peak // 1024 if sys.platform == 'darwin' else peak
print(kb)
"""


def rss_after_load_mb(model_dir: Any, what: str = "model") -> float:
    """MB resident after loading and one 8-token prefill, in a fresh process (so nothing else is counted):
    `what` "model" is anemll_fast.load (tokenizer and engine included), "parts" the model's parts alone
    on the reference backend."""
    if what not in _RSS_LOAD:
        raise ValueError(f"what: expected one of {sorted(_RSS_LOAD)}, got {what!r}")
    import anemll_fast

    env = dict(os.environ)
    # The child imports the same anemll_fast as this process (a checkout may shadow an installed one).
    root = str(Path(anemll_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", _RSS_CODE.format(load=_RSS_LOAD[what]), str(model_dir)],
                       capture_output=True, text=True,
                       env=env, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"RSS after load of {model_dir}: the child process failed:\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def per_round_ratios(ours: List[float], theirs: List[float]) -> List[float]:
    """ours / theirs round by round: both measured in the same round, under the same machine noise."""
    return [a / b for a, b in zip(ours, theirs)]


def compare_sides(models: Dict[str, Any], baselines: Dict[str, Any], steps: int, rounds: int, warmup: int,
                  res: Any, progress: Callable[[str], None], rss: bool = True) -> None:
    """`models` {name: model dir} on the reference backend against `baselines` {name: side}: figures into res."""
    ours = {name: EngineSide(d) for name, d in models.items()}
    try:
        first = next(iter(ours.values()))
        # 64 tokens where the context leaves room for the decode steps (tiny test models have less).
        n = min(PROMPT_LEN, first.context_length - steps - 1)
        if n < 2:
            raise ValueError(f"context {first.context_length} leaves no room for a prompt and {steps} decode steps")
        vocab = min(s.vocab_size for s in ours.values())
        prompt = [int(t) for t in np.random.default_rng(n).integers(min(100, vocab // 2), vocab, n)]
        sides: Dict[str, Any] = {f"{OURS} {name}": s for name, s in ours.items()}
        sides.update(baselines)
        tokens: Dict[str, List[int]] = {}

        def round_of(name: str, side: Any) -> Callable[[], Tuple[float, float]]:
            def run() -> Tuple[float, float]:
                tok, tp = thread_seconds(lambda: side.prefill(prompt))
                out, td = thread_seconds(lambda: side.decode(tok, n, steps))
                tokens[name] = [tok] + list(out)
                return n / tp, steps / td
            return run

        progress("against baselines: " + ", ".join(sides))
        got = interleaved({name: round_of(name, s) for name, s in sides.items()}, rounds, warmup)
    finally:
        for s in ours.values():
            s.close()
    p = {"prompt": n, "steps": steps, "timer": "thread CPU time"}
    prefill = {name: [a for a, _ in v] for name, v in got.items()}
    decode = {name: [b for _, b in v] for name, v in got.items()}
    for name in sides:
        res.add(Figure(f"baselines/{name}/prefill", GROUP, f"{name}: prefill, prompt {n}", "tokens/s", HIGHER,
                       prefill[name], p),
                Figure(f"baselines/{name}/decode", GROUP, f"{name}: decode, {steps} steps", "tokens/s", HIGHER,
                       decode[name], p))
    for model in models:
        mine = f"{OURS} {model}"
        for base in baselines:
            res.add(Figure(f"baselines/{model}/decode_vs/{base}", GROUP, f"{model}: decode, anemll_fast / {base}",
                           "x", HIGHER, per_round_ratios(decode[mine], decode[base]), dict(p, model=model)),
                    Figure(f"baselines/{model}/prefill_vs/{base}", GROUP,
                           f"{model}: prefill {n}, anemll_fast / {base}", "x", HIGHER,
                           per_round_ratios(prefill[mine], prefill[base]), dict(p, model=model)))
            same = next((i for i, (a, b) in enumerate(zip(tokens[mine], tokens[base])) if a != b), None)
            k = len(tokens[mine])
            res.notes.append(f"{model} vs {base}: greedy tokens " +
                             (f"equal, all {k}" if same is None else f"equal for the first {same} of {k}"))
    if rss:
        for model, d in models.items():
            progress(f"against baselines: RSS after load, {model}")
            mb, parts, files = rss_after_load_mb(d), rss_after_load_mb(d, "parts"), model_files_bytes(d) / 2 ** 20
            q = {"model": model}
            res.add(Figure(f"baselines/{model}/rss_after_load", GROUP,
                           f"{model}: RSS after anemll_fast.load (fresh process)", "MB", LOWER, [mb], q, single=True),
                    Figure(f"baselines/{model}/files", GROUP, f"{model}: model files", "MB", LOWER, [files], q,
                           single=True),
                    Figure(f"baselines/{model}/rss_per_files", GROUP, f"{model}: RSS after load / model files",
                           "x", LOWER, [mb / files], q, single=True),
                    Figure(f"baselines/{model}/rss_parts_per_files", GROUP,
                           f"{model}: RSS of the parts alone (reference backend, no tokenizer) / model files",
                           "x", LOWER, [parts / files], q, single=True))


def default_models(lut: bool) -> Dict[str, Any]:
    """The embedded default in fp16, and with `lut` its LUT4-FFN / LUT6-head conversion (converted once)."""
    from anemll_fast import default_model

    models: Dict[str, Any] = {"fp16": default_model.default_model_dir()}
    if lut:
        models[f"lut{default_model.LUT_FFN}/{default_model.LUT_LMHEAD}"] = default_model.lut_model_dir()
    return models


def against_baselines(suite: Any, res: Any, progress: Callable[[str], None], lut: Optional[bool] = None,
                      rss: bool = True) -> None:
    """The default model (and with `lut`, default: the suite's `lut_baseline`, its LUT conversion) against the
    baselines whose packages import; a note and nothing else when none does."""
    from anemll_fast.bench import baselines
    from anemll_fast.default_model import gguf_path

    lut = suite.lut_baseline if lut is None else lut
    sides = baselines.available(gguf_path())
    if not sides:
        res.notes.append("against baselines: none measured (pip install torch and/or llama-cpp-python)")
        return
    if not lut:
        res.notes.append("against baselines: the LUT4/LUT6 conversion not measured (the full suite or --lut does)")
    compare_sides(default_models(lut), sides, suite.decode_steps, suite.chat_rounds, suite.warmup, res, progress,
                  rss=rss)
