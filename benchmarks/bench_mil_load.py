"""Load time of a model as .mlpackage (protobuf) against the same model as .mlmodelc (model.mil text).

    python benchmarks/bench_mil_load.py [--repeat 5] [--workdir /tmp/anemll_fast_bench_mil]

Uses the embedded default model (SmolLM2-135M-Instruct, converted once into the user cache), writes
each part as an .mlmodelc with the project's own writer (anemll_fast.mil.text_writer, once), then
loads every part both ways with weights, alternating, `--repeat` times. Prints CPU seconds (best
of the repeats: the least disturbed by other processes) and the ratio text/protobuf; the goal
(issue 12) is a ratio within 1.5 for the whole model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from anemll_fast.default_model import default_model_dir  # noqa: E402
from anemll_fast.mil.loader import load_program  # noqa: E402
from anemll_fast.mil.text_writer import write_mlmodelc  # noqa: E402


def cpu_seconds(path: str) -> float:
    start = time.process_time()
    load_program(path)
    return time.process_time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=os.path.join("/tmp", "anemll_fast_bench_mil"))
    args = ap.parse_args()

    model = default_model_dir()
    os.makedirs(args.workdir, exist_ok=True)
    parts = sorted(p[: -len(".mlpackage")] for p in os.listdir(model) if p.endswith(".mlpackage"))
    pairs = []
    for part in parts:
        package = os.path.join(model, part + ".mlpackage")
        compiled = os.path.join(args.workdir, part + ".mlmodelc")
        if not os.path.isdir(compiled):
            write_mlmodelc(load_program(package), compiled)
        pairs.append((part, package, compiled))

    print(f"{'part':32s} {'model.mil':>10s} {'.mlpackage s':>13s} {'.mlmodelc s':>12s} {'ratio':>6s}")
    total_pkg = total_txt = 0.0
    for part, package, compiled in pairs:
        load_program(package), load_program(compiled)  # warm the file cache and imports
        pkg = txt = float("inf")
        for _ in range(args.repeat):
            pkg = min(pkg, cpu_seconds(package))
            txt = min(txt, cpu_seconds(compiled))
        size = os.path.getsize(os.path.join(compiled, "model.mil"))
        print(f"{part:32s} {size / 1e6:9.2f}M {pkg:13.3f} {txt:12.3f} {txt / pkg:6.2f}")
        total_pkg += pkg
        total_txt += txt
    print(f"{'whole model':32s} {'':>10s} {total_pkg:13.3f} {total_txt:12.3f} {total_txt / total_pkg:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
