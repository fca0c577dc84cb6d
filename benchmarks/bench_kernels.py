"""Decode matvec kernels against the bandwidth floor of this machine, one thread.

    python benchmarks/bench_kernels.py [--rounds 5] [--pool-mb 96] [--batch 64]

For each SmolLM2-135M projection shape the kernel is run over a pool of distinct weights larger than
the last-level cache (as in a real decode step, where every weight comes from DRAM once per token),
and compared with the time to stream the same stored bytes once (`stream_read_bytes`: wide loads and
nothing else). "vs floor" is kernel time / stream time: 1.0 means the kernel runs at the speed of
the bytes it reads. Times are CPU time of this thread, rounds interleaved; ratios are the result.
With --batch N the prefill product (N positions, as the backend runs it: the native register-tiled
kernel over the stored weight, or BLAS over decoded row blocks on a CPU without a vector path) is
compared with numpy's float32 BLAS on the weights expanded once (what PyTorch eager fp32 does);
"gemm vs fp32 BLAS" above 1 means the packed weight is slower.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import numpy as np  # noqa: E402

SHAPES: List[Tuple[str, int, int]] = [
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("head 49152x576", 49152, 576),
]


def _pool(make: Callable[[], object], nbytes: int, pool_bytes: int) -> List[object]:
    return [make() for _ in range(max(1, -(-pool_bytes // nbytes)))]


def _cpu(fn: Callable[[], object]) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pool-mb", type=int, default=96, help="distinct weights cycled through (> LLC)")
    ap.add_argument("--batch", type=int, default=0, help="also time the prefill GEMM with this many positions")
    ap.add_argument("--only", default="", help="comma-separated kinds: fp16,lut4,lut6")
    args = ap.parse_args()

    from anemll_fast._kernels import PackedWeight, kernel_isa, stream_read_bytes
    from anemll_fast.mil.ops.linear import packed_times

    rng = np.random.default_rng(0)
    kinds = [k for k in ("fp16", "lut4", "lut6") if not args.only or k in args.only.split(",")]
    print(f"kernels: {kernel_isa()}; pool {args.pool_mb} MB per case, {args.rounds} rounds, one thread")
    print(f"{'shape':18s} {'kind':5s} {'MB':>7s} {'kernel us':>10s} {'floor us':>9s} {'vs floor':>9s} "
          f"{'GB/s':>6s}" + (f" {'gemm vs fp32 BLAS':>18s}" if args.batch else ""))
    for label, rows, cols in SHAPES:
        for kind in kinds:
            if kind == "fp16":
                def make(rows=rows, cols=cols):
                    return PackedWeight.from_f16(rng.standard_normal((rows, cols)).astype(np.float16))
            else:
                nbits = 4 if kind == "lut4" else 6

                def make(rows=rows, cols=cols, nbits=nbits):
                    lut = rng.standard_normal((rows // 8, 1 << nbits)).astype(np.float16).astype(np.float32)
                    return PackedWeight.from_palette(rng.integers(0, 1 << nbits, (rows, cols)), lut, nbits)
            one = make()
            nbytes = one.nbytes
            pool = _pool(make, nbytes, args.pool_mb << 20)
            raw = [np.frombuffer(bytearray(nbytes), np.uint8) for _ in pool]
            for r in raw:
                r[:] = 1
            x = rng.standard_normal((cols, 1)).astype(np.float32)
            out = np.empty((rows, 1), np.float32)
            times: Dict[str, List[float]] = {"k": [], "s": [], "g": [], "b": []}
            xb = rng.standard_normal((cols, max(args.batch, 1))).astype(np.float32)
            dense = [p.decode() for p in pool[:2]] if args.batch else []
            for rnd in range(args.rounds + 1):
                tk = _cpu(lambda: [p.matmul(x, out=out) for p in pool])
                ts = _cpu(lambda: [stream_read_bytes(r) for r in raw])
                if args.batch:
                    tg = _cpu(lambda: [packed_times(p, xb) for p in pool[:2]])
                    tb = _cpu(lambda: [d @ xb for d in dense])
                if rnd:
                    times["k"].append(tk / len(pool))
                    times["s"].append(ts / len(pool))
                    if args.batch:
                        times["g"].append(tg)
                        times["b"].append(tb)
            k, s = statistics.median(times["k"]), statistics.median(times["s"])
            line = (f"{label:18s} {kind:5s} {nbytes / 2 ** 20:7.2f} {k * 1e6:10.1f} {s * 1e6:9.1f} {k / s:8.2f}x "
                    f"{nbytes / k / 1e9:6.1f}")
            if args.batch:
                line += f" {statistics.median(times['g']) / statistics.median(times['b']):17.2f}x"
            print(line, flush=True)
            del pool, raw, dense
    return 0


if __name__ == "__main__":
    sys.exit(main())
