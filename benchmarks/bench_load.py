"""Time to load the embedded default model, against the time to read its weight files.

    python benchmarks/bench_load.py [--repeat 3] [--model DIR]

Each load runs in a fresh process (`anemll_fast.load(...)`, import excluded), on the
reference backend, interleaved so that the machine's load hits every kind alike:
- parse: the program cache off (every model file parsed, as before the cache),
- first: an empty program cache (parse, then store the entries),
- second: the entries stored by `first` (what every later run of a user sees),
and `read`: reading every weight file of the model into memory (warm page cache).
Prints the median of each and second/read, the ratio the cache is judged by.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import sys, time
import anemll_fast
t = time.perf_counter()
model = anemll_fast.load(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None, backend="reference")
print(time.perf_counter() - t)
"""


def load_seconds(model: str, program_cache: str) -> float:
    env = dict(os.environ, ANEMLL_FAST_PROGRAM_CACHE=program_cache)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _CHILD, model], env=env, check=True, capture_output=True,
                         text=True, cwd=repo)
    return float(out.stdout.strip().splitlines()[-1])


def read_seconds(files: list) -> float:
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="", help="model directory (default: the embedded default)")
    args = ap.parse_args()
    from anemll_fast.default_model import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    files = sorted(p for p in model_dir.rglob("weight.bin"))
    size = sum(p.stat().st_size for p in files)
    times: dict = {"read": [], "parse": [], "first": [], "second": []}
    read_seconds(files)  # warm the page cache
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            times["read"].append(read_seconds(files))
            times["parse"].append(load_seconds(args.model, "off"))
            times["first"].append(load_seconds(args.model, cache))
            times["second"].append(load_seconds(args.model, cache))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {model_dir} ({size / 1e6:.0f} MB of weights in {len(files)} files)")
    for k, label in (("read", "read the weight files"), ("parse", "load, program cache off"),
                     ("first", "load, empty program cache"), ("second", "load, program cache filled")):
        print(f"{label:28s} {med[k]:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    print(f"second load / weight read: {med['second'] / med['read']:.1f}x; "
          f"program cache off / second load: {med['parse'] / med['second']:.1f}x")


if __name__ == "__main__":
    main()
