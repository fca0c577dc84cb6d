"""`anemll-fast convert`: build an ANEMLL-layout model from a checkpoint, a GGUF file or a random spec."""
from __future__ import annotations

import argparse
import time


def _lut(value: str):
    if value.lower() in ("none", "no", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"LUT bits must be a number or 'none', got {value!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face checkpoint, a .gguf file or a random spec to an ANEMLL model",
        description="Build ANEMLL-layout Core ML models (embeddings, multifunction FFN chunks, split LM head, "
                    "meta.yaml, tokenizer) with coremltools' MIL builder; runs on any OS.",
    )
    p.add_argument("src", nargs="?", help="Hugging Face checkpoint directory or .gguf file")
    p.add_argument("out", nargs="?", help="output model directory (must not exist or be empty)")
    p.add_argument("--random", metavar="CONFIG.json",
                   help="build a random model from a spec with Hugging Face config keys (then give only OUT)")
    p.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "gemma3"], help="architecture (default: from the source)")
    p.add_argument("--context", type=int, default=512, help="context length (default 512)")
    p.add_argument("--batch", type=int, default=64, help="prefill batch size (default 64)")
    p.add_argument("--chunks", type=int, default=1, help="number of FFN chunks (default 1)")
    p.add_argument("--lut-ffn", type=_lut, default=None, help="LUT bits for FFN weights (4, 6, 8; default none)")
    p.add_argument("--lut-lmhead", type=_lut, default=None, help="LUT bits for the LM head (default none)")
    p.add_argument("--lut-embeddings", type=_lut, default=None, help="LUT bits for embeddings (default none)")
    p.add_argument("--palettize-mode", choices=["uniform", "kmeans"], default="uniform",
                   help="LUT construction (kmeans is slow on few cores; default uniform)")
    p.add_argument("--split-lm-head", type=int, default=None,
                   help="number of logits parts (default 8 for Llama, 16 for Qwen)")
    p.add_argument("--argmax-head", "--argmax", action="store_true",
                   help="LM head outputs argmax_idx/argmax_val per part")
    p.add_argument("--contexts", default=None, metavar="N,M,...",
                   help="context switching: infer_ctx{N}/prefill_ctx{N} functions for each size (the largest is "
                        "the context length)")
    p.add_argument("--monolithic", action="store_true",
                   help="one file with embeddings, layers and LM head (ANEMLL 0.3.5 monolithic; needs --chunks 1)")
    p.add_argument("--prefix", default=None, help="file name prefix (default llama or qwen)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (--random)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anemll_fast.convert.errors import ConvertError
    from anemll_fast.convert.pipeline import convert, convert_random

    if args.random:
        out = args.out or args.src
        if out is None or (args.src and args.out):
            raise ConvertError("with --random give only the output directory")
        source, call = args.random, convert_random
    else:
        if not args.src or not args.out:
            raise ConvertError("give SRC and OUT (or --random CONFIG.json OUT)")
        source, out, call = args.src, args.out, convert
    t0 = time.perf_counter()
    path = call(source, out, arch=args.arch, context_length=args.context, batch_size=args.batch,
                num_chunks=args.chunks, lut_ffn=args.lut_ffn, lut_lmhead=args.lut_lmhead,
                lut_embeddings=args.lut_embeddings, palettize_mode=args.palettize_mode,
                split_lm_head=args.split_lm_head, argmax_head=args.argmax_head, model_prefix=args.prefix, monolithic=args.monolithic, contexts=args.contexts,
                progress=not args.quiet, seed=args.seed, overwrite=args.overwrite)
    if not args.quiet:
        print(f"converted to {path} in {time.perf_counter() - t0:.1f}s")
    return 0
