"""`anemll-fast generate` and `anemll-fast chat`.

Flags of ANEMLL's chat.py are accepted where they map (--meta, --d, --embed,
--ffn, --lmhead, --tokenizer, --context-length, --batch-size), so its users
can switch with one word.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from anemll_fast.errors import AnemllError
from anemll_fast.tokenizer import check_text


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", help="model directory, meta.yaml, Hugging Face repo id or config .json "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--backend", default="auto", choices=["auto", "coreml", "coremltools", "reference"])
    g.add_argument("--compute-units", default="cpu_and_ne", choices=["cpu_only", "cpu_and_gpu", "cpu_and_ne", "all"])
    g.add_argument("--sequential-prefill", action="store_true", help="prefill one token at a time")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    c = p.add_argument_group("ANEMLL chat.py compatibility")
    c.add_argument("--meta", help="path to meta.yaml (its folder is the model)")
    c.add_argument("--d", "--dir", dest="dir", help="model directory")
    c.add_argument("--embed", help="embeddings part name (relative to the model directory)")
    c.add_argument("--ffn", help="FFN part name (first chunk, *_chunk_01ofNN)")
    c.add_argument("--lmhead", help="LM head part name")
    c.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    c.add_argument("--context-length", type=int, help="checked against the model's context length")
    c.add_argument("--batch-size", type=int, help="checked against the model's prefill batch size")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", "--temp", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="keep the most likely tokens up to this probability mass; 1 is off (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p times the top probability; 0 is off (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of recent tokens; 1 is off (default: %(default)s)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract from the logits of recent tokens; 0 is off (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract per occurrence in recent tokens; 0 is off (default: %(default)s)")
    g.add_argument("--penalty-window", type=int, default=64,
                   help="how many recent tokens the penalties look at (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampler seed, to repeat a run (default: random, printed with the stats)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--context-shift", action="store_true",
                   help="when the context fills, keep its most recent half and go on")
    g.add_argument("--no-think", action="store_true", help="Qwen3: disable thinking (enable_thinking=False)")


def _sampling(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, penalty_window=args.penalty_window, seed=args.seed,
        stop=tuple(args.stop),
    )


def load_from_args(args: argparse.Namespace, announce: bool = False) -> Any:
    """The model the flags name; says what is loading on a terminal (or when `announce`)."""
    from pathlib import Path

    from anemll_fast.model import load
    from anemll_fast.progress import interactive, note, set_quiet

    if getattr(args, "quiet", False):
        set_quiet()
    if announce or interactive():
        note(f"[loading {args.model or args.meta or args.dir or 'the embedded default model'}...]")
    source = args.model
    if args.meta:
        source = args.meta
    elif args.dir and not source:
        source = args.dir
    parts = {"embeddings": args.embed, "ffn": args.ffn, "lm_head": args.lmhead}
    parts = {k: v for k, v in parts.items() if v}
    model = load(source, backend=args.backend, compute_units=args.compute_units,
                 tokenizer=Path(args.tokenizer) if args.tokenizer else None,
                 sequential_prefill=args.sequential_prefill, parts=parts or None)
    shapes = model.config.shapes
    for flag, given, actual in (("--context-length", args.context_length, shapes.context_length),
                                ("--batch-size", args.batch_size, shapes.batch_size)):
        if given is not None and given != actual:
            model.close()
            raise AnemllError(f"{flag} {given} does not match the model's {actual}")
    return model


def parse_prompt_ids(text: str) -> List[int]:
    """`--prompt-ids 1,2,3`: every comma-separated field an integer (no empty ones)."""
    fields = text.split(",")
    ids = []
    for k, field in enumerate(fields):
        field = field.strip()
        if not field or not field.lstrip("-").isdigit() or not field.isascii():
            what = "an empty field" if not field else f"{field!r}"
            raise AnemllError(f"--prompt-ids: field {k + 1} is {what}, not an integer "
                              f"(expected comma-separated token ids like 1,2,3; got {text!r})")
        ids.append(int(field))
    return ids


def _prompt_ids(model: Any, args: argparse.Namespace) -> List[int]:
    if args.prompt_ids is not None:
        if args.prompt is not None or args.system is not None:
            raise AnemllError("--prompt-ids: give either token ids or --prompt/--system text, not both "
                              "(the ids bypass the tokenizer and the chat template)")
        return model.encode(parse_prompt_ids(args.prompt_ids))
    if args.prompt is None:
        raise AnemllError("give --prompt TEXT or --prompt-ids 1,2,3")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
        if text is not None:
            check_text(text, flag)  # named here, not at its place in the templated prompt
    if args.no_template or model.tokenizer.chat_template is None:
        return model.encode(args.prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    text = model.apply_chat_template(messages, enable_thinking=False if args.no_think else None)
    return model.tokenizer.encode(text, add_special_tokens=False)


WHY = {
    "stop": "the model ended its turn",
    "length": "max tokens reached",
    "context": "the context is full",
    "interrupted": "stopped with Ctrl-C",
}


def why(finish_reason: Optional[str], settings: Any = None) -> str:
    text = WHY.get(finish_reason or "", finish_reason or "unknown")
    if finish_reason == "stop" and settings is not None and settings.stop:
        text = "the model ended its turn or a stop string came"
    if finish_reason == "length" and settings is not None:
        text += f" ({settings.max_tokens})"
    return text


def stats_line(last: Any, finish: Optional[str], settings: Any = None) -> str:
    return (f"prefill: {last.prefill_tokens} tokens, {last.prompt_tps:.1f} t/s | "
            f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} t/s | "
            f"ttft: {last.ttft * 1000:.0f} ms | peak memory: {last.peak_memory * 1024:.0f} MB | "
            f"seed: {last.seed} | finish: {finish} ({why(finish, settings)})")


def run_generate(args: argparse.Namespace) -> int:
    from anemll_fast.generate import settings_from, stream_tokens

    settings = settings_from(None, _sampling(args))
    with load_from_args(args) as model:
        if args.backend == "auto" and not args.json:
            print(f"[backend: {model.backend}]", file=sys.stderr)
        ids = _prompt_ids(model, args)
        pieces: List[str] = []
        tokens: List[int] = []
        last = None
        for r in stream_tokens(model, ids, settings, context_shift=args.context_shift):
            pieces.append(r.text)
            if r.token is not None:
                tokens.append(r.token)
            if not args.json:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            last = r
        assert last is not None
        if args.json:
            print(json.dumps({
                "text": "".join(pieces), "tokens": tokens, "prompt_tokens": last.prompt_tokens,
                "prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps,
                "ttft_ms": last.ttft * 1000, "finish_reason": last.finish_reason,
                "backend": model.backend, "seed": last.seed,
            }))
        else:
            print()
            print(stats_line(last, last.finish_reason, settings), file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from anemll_fast.cli_chat import run_chat as run

    return run(args)


def register(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt (chat template applied unless --no-template).")
    g.add_argument("--prompt", "-p", help="prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids (bypasses the tokenizer and template)")
    g.add_argument("--system", help="system prompt (with the chat template)")
    g.add_argument("--no-template", action="store_true", help="use the prompt as is, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and speeds")
    _add_model_options(g)
    _add_sampling_options(g)
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive chat, keeping the KV cache between turns",
                       description="Chat with a model: line editing and history on a terminal, Ctrl-C stops a "
                                   "reply, Ctrl-D leaves; /help lists the commands (/reset, /system, /save, "
                                   "/load, /stats). Piped input is read line by line.")
    c.add_argument("--system", help="system prompt")
    _add_model_options(c)
    _add_sampling_options(c)
    c.set_defaults(func=run_chat)
