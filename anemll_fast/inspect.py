"""`anemll-fast inspect`: what a model is made of, read from its files."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, TextIO

from anemll_fast.compute_plan import ComputePlanUnavailable
from anemll_fast.errors import ConfigError


def load_config(target: str) -> Any:
    """ModelConfig of a directory, repo id or config JSON."""
    from anemll_fast.config import ModelConfig
    from anemll_fast.hub import resolve

    if target.endswith(".json") and Path(target).is_file():
        return ModelConfig.from_json(target)
    return ModelConfig.from_anemll_dir(resolve(target))


def _files(config: Any) -> List[Path]:
    seen: Dict[str, Path] = {}
    for _, comp in config.components():
        seen.setdefault(comp.file_path, config.path_of(comp))
    return list(seen.values())


def describe_file(path: Path, out: TextIO) -> None:
    from anemll_fast.mil import op_histogram
    from anemll_fast.model_io import read_model_io

    io = read_model_io(path)
    kind = "multifunction, default " + repr(io.default_function) if io.multifunction else "single function"
    out.write(f"{path.name}  ({io.format}, {kind})\n")
    hist = op_histogram(path)
    for name, fio in io.functions.items():
        out.write(f"  function {name}\n")
        for label, specs in (("input", fio.inputs), ("output", fio.outputs), ("state", fio.states)):
            for spec in specs.values():
                out.write(f"    {label:<6} {spec.describe()}\n")
        ops = hist.get(name, {})
        if ops:
            total = sum(ops.values())
            text = ", ".join(f"{op} {n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
            out.write(f"    ops    {total}: {text}\n")
    anemll_meta = {k: v for k, v in io.metadata.items() if k.startswith("com.anemll")}
    if anemll_meta:
        out.write("  metadata " + ", ".join(f"{k}={v}" for k, v in sorted(anemll_meta.items())) + "\n")


def show_compute_plan(args: argparse.Namespace) -> int:
    from anemll_fast.compute_plan import compute_plan, requirement_error

    why = requirement_error()  # before reading the model: the requirement is the first thing to know
    if why:
        raise ComputePlanUnavailable(why)
    plan = compute_plan(load_config(args.model), args.compute_units)
    sys.stdout.write(json.dumps(plan.to_dict(), indent=2) + "\n" if args.json else plan.format() + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.compute_plan:
        return show_compute_plan(args)
    target = args.model
    path = Path(target)
    if path.suffix in (".mlpackage", ".mlmodelc") and path.exists():
        if args.json:
            raise ConfigError(f"{target}: --json describes a whole model directory, not one part")
        describe_file(path, sys.stdout)
        return 0
    config = load_config(target)
    if args.json:
        sys.stdout.write(config.to_json())
        return 0
    out = sys.stdout
    s = config.shapes
    out.write(f"model      {config.model_info.get('model_id', config.model_dir)}\n")
    out.write(f"directory  {config.model_dir}\n")
    out.write(
        f"shapes     context {s.context_length}, batch {s.batch_size}, hidden {s.hidden_size}, "
        f"vocab {s.vocab_size}\n"
    )
    state_len = config.state_length
    out.write(
        f"pipeline   {config.num_chunks} FFN chunk(s), {config.ffn_execution} FFN, {config.prefill_mode} prefill, "
        f"{config.logits_parts} logits part(s){' (argmax in model)' if config.argmax_in_model else ''}"
        f"{f', state length {state_len}' if state_len else ''}\n\n"
    )
    describe_states(config, out)
    describe_schedule(config, out)
    out.write("\n")
    for file in _files(config):
        describe_file(file, out)
        out.write("\n")
    return 0


def describe_states(config: Any, out: TextIO) -> None:
    """Each state (shared by name) with its spec and the parts and functions declaring it."""
    for name, (spec, labels) in config.states().items():
        out.write(f"state      {spec.describe()}  in {', '.join(labels)}\n")


def describe_schedule(config: Any, out: TextIO) -> None:
    """Which function the engine runs for which positions (see anemll_fast.engine.prefill_writes_at_position)."""
    from anemll_fast.engine import prefill_writes_at_position

    ctx, batch = config.shapes.context_length, config.shapes.batch_size
    window = config.sliding_window
    limit = min(window or ctx, ctx)
    kind = "monolithic file" if config.monolithic else "chunks"
    if config.ffn_prefill and prefill_writes_at_position(config) and config.prefill_mode == "batch":
        out.write(f"schedule   prompt: prefill batches of {batch} while a batch fits below position {limit}, "
                  f"other positions one at a time\n")
    else:
        out.write("schedule   prompt: one position at a time through infer (prefill not used)\n")
    if window:
        out.write(f"schedule   positions < {window}: infer; >= {window}: infer_rotate (sliding window {window}); "
                  f"prefill_rotate never (inexact for batches)\n")
    else:
        out.write(f"schedule   every position: {config.ffn_infer[0].function or 'infer'} of the {kind}\n")
    if config.context_functions:
        sizes = list(config.context_functions) + [ctx]
        names = [config.context_functions[n]["ffn_infer"][0].function for n in sizes[:-1]]
        names.append(config.ffn_infer[0].function)
        out.write("schedule   context switching: " + ", then ".join(
            f"{name} below position {n}" for name, n in zip(names, sizes)) +
            " (the cache moves up when positions outgrow a size)\n")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a model's parts, functions, inputs/outputs/states and op counts",
        description="Show every component of an ANEMLL model (directory, Hugging Face repo id, "
        "config JSON, or one .mlpackage/.mlmodelc): functions, inputs, outputs and states with "
        "shapes and dtypes, and the MIL op histogram.",
    )
    p.add_argument("model", help="model directory, Hugging Face repo id, config .json, or one model file")
    p.add_argument("--json", action="store_true", help="print the ModelConfig (or the compute plan) as JSON")
    p.add_argument("--compute-plan", action="store_true",
                   help="where Core ML runs each part: ops and estimated cost per device (macOS 14.4+)")
    from anemll_fast.model import COMPUTE_UNITS

    p.add_argument("--compute-units", default="cpu_and_ne", choices=COMPUTE_UNITS,
                   help="compute units the plan is made for (default cpu_and_ne)")
    p.set_defaults(func=run)
