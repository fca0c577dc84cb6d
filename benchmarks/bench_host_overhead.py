"""Host time per decode step of the native engine on the null backend, per sampler chain, at Qwen3-0.6B,
Llama-3.2-1B and Gemma 3 1B layouts, beside the time to read the logits once.

The suite defines and times it (anemll_fast/bench/suites.py, `host_overhead`); this is
`anemll-fast bench --only host`, kept for the notes that cite this script:

    python benchmarks/bench_host_overhead.py [--suite quick|full] [--json out.json] [--plot DIR]
"""
from __future__ import annotations

import sys

from anemll_fast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--only", "host"] + sys.argv[1:]))
