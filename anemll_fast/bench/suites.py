"""What each suite measures. Python prepares engines, logits and prompts; the timed loops run in the native
extension (`NativeEngine.bench_decode` / `bench_prefill`, `NativeSampler.bench`, `bench_read_floor`), which
fill arrays of durations that become Figures here.

Parts: `e2e` (a model on each backend: prefill and decode tokens/s over prompt lengths, time to first token,
memory, the per-part breakdown from the engine's native counters, and the ratio to the chat.py-style Python
loop on the same backend), `host` (the null backend at real models' layouts per sampler chain, beside the
bandwidth floor), `sampler` (each chain over 151,936 and 262,144 vocabularies). `host` and `sampler` need no
model. Against PyTorch / llama.cpp on the default model: anemll_fast/bench/versus.py.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from anemll_fast.bench.stats import HIGHER, LOWER, Figure, interleaved, micros, millis, rates
from anemll_fast.sampling import SamplingSettings

PARTS = ("e2e", "host", "sampler")

# Sampler chains, in the order of the chain (anemll_fast/sampling.py, csrc/engine/sampler.h).
CHAINS: Dict[str, SamplingSettings] = {
    "greedy": SamplingSettings(),
    "temperature": SamplingSettings(temperature=0.7, seed=1),
    "top-k 40": SamplingSettings(temperature=0.7, top_k=40, seed=1),
    "top-p 0.9": SamplingSettings(temperature=0.7, top_p=0.9, seed=1),
    "min-p 0.05": SamplingSettings(temperature=0.7, min_p=0.05, seed=1),
    "penalties": SamplingSettings(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1,
                                  logit_bias={13: 1.0}),
    "full chain": SamplingSettings(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                   presence_penalty=0.2, frequency_penalty=0.1, logit_bias={13: 1.0}, seed=1),
}

# Real models' layouts as ANEMLL converts them (context 512, batch 64, 16 logits parts), for the null backend.
LAYOUTS: Dict[str, Dict[str, Any]] = {
    "Qwen3-0.6B": dict(prefix="qwen", hidden_size=1024, num_layers=28, num_kv_heads=8, head_dim=128,
                       vocab_size=151936),
    "Llama-3.2-1B": dict(prefix="llama", hidden_size=2048, num_layers=16, num_kv_heads=8, head_dim=64,
                         vocab_size=128256),
    # Gemma 3's local layers slide over a 512 window: a 1024 context runs infer_rotate past it.
    "Gemma-3-1B": dict(prefix="gemma3", hidden_size=1152, num_layers=26, num_kv_heads=1, head_dim=256,
                       vocab_size=262144, context_length=1024, sliding_window=512,
                       layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                    for i in range(26)]),
}
VOCABS = (151936, 262144)


@dataclass(frozen=True)
class Suite:
    """Repetition counts and sizes of one suite."""

    name: str
    prompt_lengths: Tuple[Any, ...]  # ints, or "context-64"
    prefill_reps: int
    decode_steps: int
    chat_rounds: int
    chat_steps: int
    host_steps: int
    host_chains: Tuple[str, ...]
    sampler_reps: int
    sampler_chains: Tuple[str, ...]
    compute_units: Tuple[str, ...]
    warmup: int = 1
    parts: Tuple[str, ...] = PARTS
    layouts: Tuple[str, ...] = tuple(LAYOUTS)
    vocabs: Tuple[int, ...] = VOCABS
    # Against the baselines, also the default model's LUT4/LUT6 conversion (converted once: minutes).
    lut_baseline: bool = False


SUITES: Dict[str, Suite] = {
    "quick": Suite("quick", prompt_lengths=(16, 64), prefill_reps=3, decode_steps=12, chat_rounds=3, chat_steps=6,
                   host_steps=600, host_chains=("greedy", "top-p 0.9", "full chain"), sampler_reps=40,
                   sampler_chains=tuple(CHAINS), compute_units=("cpu_only", "cpu_and_ne")),
    "full": Suite("full", prompt_lengths=(16, 64, 256, "context-64"), prefill_reps=5, decode_steps=32,
                  chat_rounds=5, chat_steps=16, host_steps=5000, host_chains=tuple(CHAINS), sampler_reps=300,
                  sampler_chains=tuple(CHAINS), compute_units=("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all"),
                  lut_baseline=True),
}


@dataclass
class Results:
    figures: List[Figure] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, *figs: Figure) -> None:
        self.figures.extend(figs)


Progress = Callable[[str], None]


def _random_logits(parts: int, size: int, seed: int = 0) -> List[np.ndarray]:
    """fp16 logits shaped like a real head's (normal, sd 3: a few hundred tokens within reach of the top)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=size) * 3).astype(np.float16) for _ in range(parts)]


# ---------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def footprint_bytes() -> Optional[int]:
    """macOS: the process's physical footprint (what Activity Monitor shows as Memory), else None."""
    if sys.platform != "darwin":
        return None
    import ctypes
    import os

    class RusageInfoV0(ctypes.Structure):  # <libproc.h> rusage_info_v0
        _fields_ = [("uuid", ctypes.c_uint8 * 16)] + [(n, ctypes.c_uint64) for n in (
            "user_time", "system_time", "pkg_idle_wkups", "interrupt_wkups", "pageins", "wired_size",
            "resident_size", "phys_footprint", "proc_start_abstime", "proc_exit_abstime")]

    try:
        lib = ctypes.CDLL("/usr/lib/libproc.dylib")
        info = RusageInfoV0()
        if lib.proc_pid_rusage(os.getpid(), 0, ctypes.byref(info)) != 0:
            return None
        return int(info.phys_footprint)
    except OSError:
        return None


# ---------------------------------------------------------------- end to end
def _prompt(length: int, vocab: int, seed: int = 0) -> List[int]:
    rng = np.random.default_rng(seed)
    low = min(100, vocab // 2)
    return [int(t) for t in rng.integers(low, vocab, length)]


def prompt_lengths(suite: Suite, context: int, steps: int) -> List[int]:
    """The suite's prompt lengths that leave room for the decode steps in `context` ("context-64" resolved)."""
    out: List[int] = []
    for p in suite.prompt_lengths:
        n = context - 64 if p == "context-64" else int(p)
        if 2 <= n and n + steps <= context and n not in out:
            out.append(n)
    if not out:  # a tiny context: one prompt of half of it
        out.append(max(2, min(context // 2, context - steps)))
    return out


def end_to_end(model_ref: Any, backend: str, compute_units: str, suite: Suite, res: Results,
               progress: Progress) -> None:
    """One model on one backend (and compute-units setting)."""
    import anemll_fast

    tag = backend if backend == "reference" else f"{backend}/{compute_units}"
    progress(f"e2e {tag}: loading")
    t = time.perf_counter()
    kwargs = {} if backend == "reference" else {"compute_units": compute_units, "check_placement": False}
    model = anemll_fast.load(model_ref, backend=backend, **kwargs)
    load_s = time.perf_counter() - t
    with model:
        eng = model.engine._eng
        ctx, vocab = model.context_length, model.valid_vocab
        res.add(Figure(f"e2e/{tag}/load", "end to end", f"{tag}: load (once)", "s", LOWER, [load_s],
                       {"backend": backend, "compute_units": compute_units}, single=True))
        if backend != "reference":
            _ane_share(model, tag, res)
        steps = suite.decode_steps
        lengths = prompt_lengths(suite, ctx, steps)
        progress(f"e2e {tag}: warm-up")
        eng.bench_prefill(_prompt(lengths[0], vocab), suite.warmup)
        per_step: List[Dict[str, Any]] = []
        for n in lengths:
            progress(f"e2e {tag}: prompt {n}")
            prompt = _prompt(n, vocab, seed=n)
            pre, first, tok = eng.bench_prefill(prompt, suite.prefill_reps)
            p = {"backend": backend, "compute_units": compute_units, "prompt": n}
            res.add(Figure(f"e2e/{tag}/prefill/{n}", "end to end", f"{tag}: prefill, prompt {n}", "tokens/s",
                           HIGHER, rates(pre, n - 1), p),
                    Figure(f"e2e/{tag}/ttft/{n}", "end to end", f"{tag}: time to first token, prompt {n}", "ms",
                           LOWER, millis(first), p))
            ns = _decode_with_counters(eng, tok, n, steps, per_step)
            res.add(Figure(f"e2e/{tag}/decode/{n}", "end to end", f"{tag}: decode at positions {n}..{n + steps - 1}",
                           "tokens/s", HIGHER, rates(ns), dict(p, steps=steps)))
        _breakdown(per_step, tag, backend, compute_units, res)
        res.add(Figure(f"e2e/{tag}/peak_rss", "memory", f"{tag}: peak RSS of the process", "MB", LOWER,
                       [peak_rss_bytes() / 2 ** 20], {"backend": backend}, single=True))
        fp = footprint_bytes()
        if fp is not None:
            res.add(Figure(f"e2e/{tag}/footprint", "memory", f"{tag}: memory footprint", "MB", LOWER,
                           [fp / 2 ** 20], {"backend": backend}, single=True))
        progress(f"e2e {tag}: against the chat.py-style loop")
        _against_chatpy(model, backend, compute_units, tag, lengths[0], suite, res)


def _decode_with_counters(eng: Any, token: int, pos: int, steps: int, per_step: List[Dict[str, Any]]) -> np.ndarray:
    """`steps` decode steps, each timed natively, with the engine's per-part counters read after each one
    (between steps, not inside them) so that every part has a distribution over the steps."""
    eng.set_timing(True)
    out = np.zeros(steps, np.int64)
    try:
        for k in range(steps):
            eng.reset_timing()
            tokens, ns = eng.bench_decode(token, pos + k, 1)
            token, out[k] = int(tokens[0]), ns[0]
            per_step.append(eng.timing_counters())
    finally:
        eng.set_timing(False)
    return out


def _breakdown(per_step: List[Dict[str, Any]], tag: str, backend: str, compute_units: str, res: Results) -> None:
    """Milliseconds of each part per decode step, from the engine's native counters."""
    names = ["embeddings"] + [f"FFN chunk {i + 1}" for i in range(len(per_step[0]["chunks"]))] + \
            ["LM head", "sampler", "host"]
    for i, name in enumerate(names):
        samples = [1e3 * (c["chunks"][i - 1] if name.startswith("FFN") else
                          c[{"embeddings": "embeddings", "LM head": "lm_head", "sampler": "sampler",
                             "host": "host"}[name]]) for c in per_step]
        res.add(Figure(f"breakdown/{tag}/{name}", "per token", f"{tag}: {name}", "ms/token", LOWER, samples,
                       {"backend": backend, "compute_units": compute_units, "part": name, "steps": len(per_step)}))


def _ane_share(model: Any, tag: str, res: Results) -> None:
    """Core ML's estimated share of the cost on the Neural Engine, over every function of the model."""
    from anemll_fast.compute_plan import DEVICES, ComputePlanUnavailable

    try:
        plan = model.compute_plan()
    except ComputePlanUnavailable as exc:
        res.notes.append(f"{tag}: compute plan unavailable: {exc}")
        return
    total = sum(f.cost.get(d, 0.0) for f in plan.functions for d in DEVICES)
    if total > 0:
        ne = sum(f.cost.get("neural_engine", 0.0) for f in plan.functions)
        res.add(Figure(f"e2e/{tag}/ane_share", "end to end", f"{tag}: Neural Engine share (compute plan)", "%",
                       HIGHER, [100 * ne / total], {"compute_units": plan.compute_units}, single=True))


def _native_round(eng: Any, prompt: List[int], steps: int, tokens: Dict[str, List[int]],
                  key: str) -> Callable[[], float]:
    """One round of the native engine for interleaved(): prefill, then `steps` decode steps timed natively;
    decode tokens/s, the greedy tokens kept in tokens[key]."""
    def run() -> float:
        _, _, tok = eng.bench_prefill(prompt, 1)
        out, ns = eng.bench_decode(tok, len(prompt), steps)
        tokens[key] = [tok] + [int(t) for t in out]
        return steps * 1e9 / int(ns.sum())
    return run


def _against_chatpy(model: Any, backend: str, compute_units: str, tag: str, n: int, suite: Suite,
                    res: Results) -> None:
    """Decode tokens/s of the native engine and of the chat.py-style loop, same model and prompt, interleaved."""
    from anemll_fast.bench.chatpy_loop import ChatPyLoop

    loop = ChatPyLoop(model.config, backend, compute_units)
    eng = model.engine._eng
    prompt = _prompt(n, model.valid_vocab, seed=n)
    steps = suite.chat_steps
    tokens: Dict[str, List[int]] = {}

    native = _native_round(eng, prompt, steps, tokens, "anemll_fast")

    def chatpy() -> float:
        out, seconds = loop.timed_decode(prompt, steps)
        tokens["chat.py loop"] = out
        return steps / seconds

    got = interleaved({"anemll_fast": native, "chat.py loop": chatpy}, suite.chat_rounds, suite.warmup)
    p = {"backend": backend, "compute_units": compute_units, "prompt": n, "steps": steps}
    for side, values in got.items():
        res.add(Figure(f"vs_chatpy/{tag}/{side}", "against chat.py", f"{tag}: {side} decode", "tokens/s", HIGHER,
                       values, p))
    ratios = [a / b for a, b in zip(got["anemll_fast"], got["chat.py loop"])]
    res.add(Figure(f"vs_chatpy/{tag}/ratio", "against chat.py", f"{tag}: anemll_fast / chat.py loop, decode",
                   "x", HIGHER, ratios, p))
    if tokens["anemll_fast"] != tokens["chat.py loop"]:
        res.notes.append(f"{tag}: the chat.py-style loop produced other greedy tokens than anemll_fast "
                         f"({tokens['chat.py loop'][:8]} vs {tokens['anemll_fast'][:8]})")


# ---------------------------------------------------------------- host overhead (null backend)
def null_engine(layout: str, sampling: SamplingSettings) -> Any:
    from anemll_fast.engine import Engine
    from anemll_fast.layout import anemll_config

    cfg = anemll_config(**LAYOUTS[layout])
    eng = Engine(cfg, "null", sampling=sampling)
    # The null backend leaves the logits as they are: give them a real head's spread.
    views = eng._eng.logits_views()
    for view, values in zip(views, _random_logits(len(views), views[0].size)):
        view[:] = values[: view.size]
    return eng


def _null_steps(eng: Any, steps: int) -> np.ndarray:
    """`steps` decode steps in rounds that stay in the context, each from a fresh cache of 8 tokens."""
    native, ctx = eng._eng, eng.context_length
    out = []
    left = steps
    while left > 0:
        n = min(left, ctx - 9)
        native.reset()
        native.prefill(list(range(1, 9)))
        _, ns = native.bench_decode(7, 8, n)
        out.append(ns)
        left -= n
    return np.concatenate(out)


def host_overhead(suite: Suite, res: Results, progress: Progress) -> None:
    """Per-step host time of the engine on the null backend (which returns at once), per chain and layout,
    beside the time to read the logits once; and what the timing counters cost, as a ratio."""
    from anemll_fast import _native

    for layout in suite.layouts:
        progress(f"host overhead: {layout}")
        for chain in suite.host_chains:
            sampling = CHAINS[chain]
            eng = null_engine(layout, sampling)
            # Whole-vocabulary chains cost ~50x greedy: fewer steps keep the suite's time in bounds.
            steps = suite.host_steps if sampling.greedy or 0 < sampling.top_k <= 100 else max(suite.host_steps // 10, 30)
            _null_steps(eng, min(steps, 50))  # warm-up
            ns = _null_steps(eng, steps)
            res.add(Figure(f"host/{layout}/{chain}", "host overhead (null backend)", f"{layout}: {chain}",
                           "us/step", LOWER, micros(ns), {"layout": layout, "chain": chain, "steps": steps}))
            if chain == suite.host_chains[0]:
                floor = _native.bench_read_floor(eng._eng.logits_views(), max(steps // 10, 20))
                res.add(Figure(f"host/{layout}/floor", "host overhead (null backend)",
                               f"{layout}: read the logits once (floor)", "us", LOWER, micros(floor),
                               {"layout": layout}))
                _timing_cost(eng, layout, steps, res)
            eng.close()


def _timing_cost(eng: Any, layout: str, steps: int, res: Results) -> None:
    """Median step time with the per-part counters on over off, interleaved rounds."""
    native = eng._eng

    def run(on: bool) -> Callable[[], float]:
        def go() -> float:
            native.set_timing(on)
            return float(np.median(_null_steps(eng, steps)))
        return go

    got = interleaved({"on": run(True), "off": run(False)}, 3, 1)
    native.set_timing(False)
    res.add(Figure(f"host/{layout}/timing_cost", "host overhead (null backend)",
                   f"{layout}: greedy step, timing counters on / off", "x", LOWER,
                   [a / b for a, b in zip(got["on"], got["off"])], {"layout": layout}))


# ---------------------------------------------------------------- samplers
def samplers(suite: Suite, res: Results, progress: Progress) -> None:
    """Each chain's time per token over fp16 logits parts of real vocabularies, beside the read floor."""
    from anemll_fast import _native

    history = _prompt(64, 50000, seed=1)
    for vocab in suite.vocabs:
        progress(f"samplers: vocabulary {vocab:,}")
        parts = _random_logits(16, vocab // 16, seed=vocab)
        floor = _native.bench_read_floor(parts, suite.sampler_reps)
        res.add(Figure(f"sampler/{vocab}/floor", "samplers", f"vocab {vocab:,}: read the logits once (floor)", "us",
                       LOWER, micros(floor), {"vocab": vocab}))
        for chain in suite.sampler_chains:
            s = _native.NativeSampler(vocab, CHAINS[chain].to_native(), 4096)
            s.bench(parts, history, max(suite.warmup, 1))
            ns = s.bench(parts, history, suite.sampler_reps)
            res.add(Figure(f"sampler/{vocab}/{chain}", "samplers", f"vocab {vocab:,}: {chain}", "us", LOWER,
                           micros(ns), {"vocab": vocab, "chain": chain}))


def with_parts(suite: Suite, parts: Sequence[str]) -> Suite:
    return replace(suite, parts=tuple(parts))
