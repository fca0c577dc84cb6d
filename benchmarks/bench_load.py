"""Time to load the embedded default model, against the time to read its weight files.

    python benchmarks/bench_load.py [--repeat 3] [--model DIR]

Each load runs in a fresh process (`anemll_fast.load(...)`, import excluded), on the
reference backend, interleaved so that the machine's load hits every kind alike:
- parse: the program cache off (every model file parsed, as before the cache),
- first: an empty program cache (parse, then store the entries),
- second: the entries stored by `first` (what every later run of a user sees),
and `read`: reading every weight file of the model into memory (warm page cache).
Prints the median of each and second/read, the ratio the cache is judged by, with the
CPU time of each load (the machine is shared: wall time includes waiting for a core) and
the time `import anemll_fast` takes before it.

The children compile Python modules to bytecode once, under a temporary
PYTHONPYCACHEPREFIX, as an installed package has them (a checkout run with
PYTHONDONTWRITEBYTECODE=1 would otherwise compile anemll_fast's modules in every load).
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
from typing import Dict, List, Tuple

_CHILD = """
import sys, time
t0 = time.perf_counter()
import anemll_fast
t = time.perf_counter()
c = time.process_time()
model = anemll_fast.load(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None, backend="reference")
print(time.perf_counter() - t, time.process_time() - c, t - t0)
"""


def load_seconds(model: str, program_cache: str, pycache: str) -> Tuple[float, float, float]:
    """(wall, CPU) seconds of load() in a fresh process, and the wall seconds of its `import anemll_fast`."""
    env = dict(os.environ, ANEMLL_FAST_PROGRAM_CACHE=program_cache, PYTHONPYCACHEPREFIX=pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _CHILD, model], env=env, check=True, capture_output=True,
                         text=True, cwd=repo)
    wall, cpu, imp = map(float, out.stdout.strip().splitlines()[-1].split())
    return wall, cpu, imp


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
    times: Dict[str, List[float]] = {"read": [], "parse": [], "first": [], "second": []}
    cpu: Dict[str, List[float]] = {k: [] for k in times}
    imports: List[float] = []
    read_seconds(files)  # warm the page cache
    with tempfile.TemporaryDirectory() as pycache:
        load_seconds(args.model, "off", pycache)  # compiles the bytecode, untimed
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                times["read"].append(read_seconds(files))
                for kind, where in (("parse", "off"), ("first", cache), ("second", cache)):
                    wall, used, imp = load_seconds(args.model, where, pycache)
                    times[kind].append(wall)
                    cpu[kind].append(used)
                    imports.append(imp)
    cpu["read"] = times["read"]  # measured in this process: wall
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {model_dir} ({size / 1e6:.0f} MB of weights in {len(files)} files)")
    for k, label in (("read", "read the weight files"), ("parse", "load, program cache off"),
                     ("first", "load, empty program cache"), ("second", "load, program cache filled")):
        print(f"{label:28s} {med[k]:6.2f} s  CPU {statistics.median(cpu[k]):6.2f} s   "
              f"(runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    print(f"import anemll_fast (before load, not counted): {statistics.median(imports):.3f} s")
    print(f"second load / weight read: {med['second'] / med['read']:.1f}x; "
          f"program cache off / second load: {med['parse'] / med['second']:.1f}x")


if __name__ == "__main__":
    main()
