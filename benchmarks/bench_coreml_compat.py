"""A coremltools script through the anemll_fast drop-in vs the same script on coremltools, side by side.

    python benchmarks/bench_coreml_compat.py MODEL_DIR [--prompt-len 70] [--max-tokens 32]
    python benchmarks/bench_coreml_compat.py MODEL_DIR --script /path/to/chat.py -- --meta MODEL_DIR/meta.yaml ...

By default the script is tests/coremltools_driver.py, a generation loop written against coremltools'
API the way ANEMLL's chat.py drives a model (64-token prefill batches, `infer` per token, one shared
state, logits parts concatenated); it reports load, prefill and decode times. With --script, any
coremltools script (ANEMLL's chat.py or chat_full.py) is timed end to end (wall seconds).

Rows: `coremltools` (plain `python SCRIPT`; macOS only, elsewhere coremltools cannot predict),
`drop-in` (`python -m anemll_fast.coreml_compat SCRIPT`: native Core ML on macOS, the reference
backend elsewhere) and, for the default script, `anemll_fast` (the native engine on the same model
and tokens). Each row is a fresh process, run --repeat times (best kept).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's anemll_fast, as the subprocesses get it
DRIVER = REPO / "tests" / "coremltools_driver.py"


def run(cmd: List[str], env: Dict[str, str]) -> Dict[str, float]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail, "wall_s": wall}
    out: Dict[str, float] = {"wall_s": wall, "tail": r.stdout.strip().splitlines()[-4:]}
    try:
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, AttributeError):
        pass
    return out


def engine_row(model_dir: str, prompt: List[int], n: int) -> Dict[str, float]:
    import anemll_fast

    t = time.perf_counter()
    with anemll_fast.load(model_dir) as model:
        load_s = time.perf_counter() - t
        first = None
        t = time.perf_counter()
        tokens = []
        for r in anemll_fast.stream_generate(model, prompt, max_tokens=n, temperature=0.0):
            if r.token is not None:
                tokens.append(r.token)
                first = first or time.perf_counter()
        done = time.perf_counter()
    return {"tokens": tokens, "load_s": load_s, "prefill_s": (first or done) - t, "decode_s": done - (first or done),
            "backend": model.backend}


def best(rows: List[Dict[str, float]]) -> Dict[str, float]:
    ok = [r for r in rows if "error" not in r]
    return min(ok, key=lambda r: r.get("decode_s", r["wall_s"])) if ok else rows[-1]


def fmt(row: Optional[Dict[str, float]], n: int) -> str:
    if row is None:
        return "skipped"
    if "error" in row:
        return f"failed: {row['error'][:100]}"
    if "decode_s" not in row:  # a script of its own: wall time and what it printed last
        tail = " | ".join(line.strip() for line in row.get("tail", []) if line.strip())
        return f"wall {row['wall_s']:.2f} s | {tail}"
    decoded = max(len(row.get("tokens", [])) - 1, 1)
    return (f"load {row['load_s']:.2f} s | prefill {row['prefill_s'] * 1000:.0f} ms | decode {row['decode_s'] * 1000 / decoded:.1f} "
            f"ms/token | wall {row.get('wall_s', float('nan')):.2f} s")


def main() -> int:
    argv = sys.argv[1:]
    extra: List[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-len", type=int, default=70)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--script", help="time this coremltools script instead (arguments after --)")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    prompt = [(i * 37 + 11) % 500 + 3 for i in range(args.prompt_len)]
    if args.script:
        cmd = [args.script, *extra]
    else:
        cmd = [str(DRIVER), args.model_dir, "--prompt-ids", ",".join(map(str, prompt)),
               "--max-tokens", str(args.max_tokens), "--stats"]
    rows: Dict[str, Optional[Dict[str, float]]] = {}
    if sys.platform == "darwin":
        rows["coremltools"] = best([run([sys.executable, *cmd], env) for _ in range(args.repeat)])
    else:
        rows["coremltools"] = {"error": "coremltools cannot predict off macOS", "wall_s": 0.0}
    rows["drop-in"] = best([run([sys.executable, "-m", "anemll_fast.coreml_compat", *cmd], env)
                            for _ in range(args.repeat)])
    rows["anemll_fast"] = None if args.script else engine_row(args.model_dir, prompt, args.max_tokens)
    from anemll_fast.coreml_compat.files import backend_name

    what = (f"script: {args.script} {' '.join(extra)}" if args.script else
            f"script: tests/coremltools_driver.py | prompt {args.prompt_len} tokens, {args.max_tokens} generated")
    print(f"model: {args.model_dir} | drop-in backend: {backend_name()} | {what}")
    for name, row in rows.items():
        print(f"  {name:12s} {fmt(row, args.max_tokens)}")
    same = [r.get("tokens") for r in rows.values() if r and "tokens" in r]
    if len(same) > 1:
        print("  same tokens:", all(t == same[0] for t in same))
    ct, di = rows["coremltools"], rows["drop-in"]
    if ct and di and "decode_s" in ct and "decode_s" in di and di["decode_s"] > 0:
        print(f"  decode speed-up of the drop-in over coremltools: {ct['decode_s'] / di['decode_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
