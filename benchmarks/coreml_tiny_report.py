"""Core ML on a tiny converted model: correctness asserted, placement and latency reported.

Run by .github/workflows/macos.yml against the installed wheel. On `--assert-units` (cpu_only by default) the
greedy tokens must equal the numpy reference decoder's; on every other compute unit the script reports the
compute plan (MLComputePlan) and the latency per decode step and per prediction without asserting anything:
hosted macOS runners are virtual machines that may have no Neural Engine.

    python benchmarks/coreml_tiny_report.py [--backend coreml] [--units cpu_only cpu_and_ne]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anemll_fast
from anemll_fast.compute_plan import ComputePlanUnavailable
from anemll_fast.testing.tiny import build_tiny_model


def run(model_dir: Path, backend: str, units: str, prompt: list, steps: int) -> list:
    model = anemll_fast.load(model_dir, backend=backend, compute_units=units, check_placement=False)
    with model:
        try:
            print(model.compute_plan().format())
        except ComputePlanUnavailable as exc:
            print(f"compute plan: unavailable: {exc}")
        eng = model.engine
        eng.reset()
        # The first token comes from infer on the last prompt position (ANEMLL's rule), then one step per token.
        t0 = time.perf_counter()
        eng.prefill(prompt[:-1])
        t1 = time.perf_counter()
        tok = eng.step(prompt[-1], len(prompt) - 1)
        before = dict(eng.counters)
        tokens, pos = [], len(prompt)
        t2 = time.perf_counter()
        for _ in range(steps):
            tokens.append(tok)
            tok = eng.step(tok, pos)
            pos += 1
        t3 = time.perf_counter()
        tokens.append(tok)
        calls = {k: eng.counters[k] - before.get(k, 0) for k in eng.counters}
        predictions = sum(calls.values())
        per_step = (t3 - t2) / steps
        print(f"[{backend} {units}] prefill {len(prompt) - 1} tokens: {1000 * (t1 - t0):.2f} ms; decode: "
              f"{1000 * per_step:.3f} ms/token over {steps} steps; "
              f"{1000 * (t3 - t2) / max(predictions, 1):.3f} ms/prediction ({calls})")
        if backend == "coreml":
            print(f"[{backend} {units}] backend counters: {eng._backend.stats()}")
        return tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="coreml", choices=["coreml", "coremltools", "reference"])
    ap.add_argument("--units", nargs="+", default=["cpu_only", "cpu_and_ne", "all"])
    ap.add_argument("--assert-units", default="cpu_only")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny", arch="llama", context_length=64, batch_size=8, num_chunks=2,
                                tied=False, split_lm_head=2, seed=7)
        prompt = [5, 17, 42, 99, 3, 250, 7]
        expected = tiny.reference().greedy(prompt, args.steps + 1)
        status = 0
        for units in args.units:
            got = run(tiny.path, args.backend, units, prompt, args.steps)
            same = got == expected[: len(got)]
            print(f"[{args.backend} {units}] tokens {'match' if same else 'DIFFER from'} the numpy reference"
                  + ("" if same else f": {got} vs {expected[: len(got)]}"))
            if units == args.assert_units and not same:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
