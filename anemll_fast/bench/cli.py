"""`anemll-fast bench [MODEL] [--suite quick|full] [--backend ...] [--json out.json] [--plot out_dir]
[--compare previous.json] [--lut] [--quiet]`: the benchmark suite, table on stdout.

Every option is checked before anything runs (a bad --compare file or a missing matplotlib is reported at
once, not after minutes of measuring)."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from anemll_fast.bench import BenchError

BACKEND_CHOICES = ("coreml", "coremltools", "reference")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a Hugging Face repo id, resolved by anemll_fast.load


def register(sub: Any) -> None:
    from anemll_fast.bench.suites import PARTS, SUITES
    from anemll_fast.model import COMPUTE_UNITS

    p = sub.add_parser(
        "bench", help="benchmark the engine: tokens/s, per-part time, against the chat.py-style loop, samplers",
        description="Measure anemll_fast on this machine: end to end per backend (prefill/decode tokens/s over "
                    "prompt lengths, time to first token, memory, where each token's time goes, against ANEMLL's "
                    "chat.py-style Python loop; with the default model, against PyTorch and llama.cpp when "
                    "installed), host overhead on the null backend at real models' layouts, and the samplers. "
                    "The timed loops run natively; each figure has its min/median/max.")
    p.add_argument("model", nargs="?", default=None,
                   help="model directory or Hugging Face repo (default: the embedded SmolLM2-135M)")
    p.add_argument("--suite", choices=sorted(SUITES), default="quick", help="quick (minutes) or full")
    p.add_argument("--backend", action="append", choices=BACKEND_CHOICES, default=None,
                   help="backend for the end-to-end figures (repeatable; default: every one available)")
    p.add_argument("--compute-units", action="append", choices=COMPUTE_UNITS, default=None,
                   help="Core ML compute units to measure (repeatable; default: the suite's)")
    p.add_argument("--only", default=None, metavar="PARTS",
                   help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    p.add_argument("--lut", action="store_true",
                   help="against the PyTorch / llama.cpp baselines (run with the default model when their packages "
                        "import), also measure the default model's LUT4-FFN / LUT6-head conversion (converted once "
                        "into the cache; the full suite always does)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots there (needs the [bench] extra)")
    p.add_argument("--compare", default=None, metavar="PREVIOUS.json",
                   help="print (and plot) the ratio of each figure to an earlier run's JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=run_bench)


def _check_model(model: Optional[str]) -> None:
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "meta.yaml").is_file():
            raise BenchError(f"MODEL {model}: no meta.yaml there: not an ANEMLL model directory")
        return
    if not _REPO_ID.match(model) or model.startswith((".", "~")):
        raise BenchError(f"MODEL {model}: no such model directory")


def _parts(only: Optional[str]) -> List[str]:
    from anemll_fast.bench.suites import PARTS

    if only is None:
        return list(PARTS)
    parts = [p.strip() for p in only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise BenchError(f"--only: unknown part {bad[0] if bad else only!r} (known: {', '.join(PARTS)})")
    return parts


def _backends(asked: Optional[List[str]]) -> List[str]:
    from anemll_fast.model import _pick_backend, available_backends

    if not asked:
        return available_backends()
    return [_pick_backend(b) for b in dict.fromkeys(asked)]  # ValueError naming an unavailable one


def run_bench(args: argparse.Namespace) -> int:
    from anemll_fast import progress as progress_mod
    from anemll_fast.bench import report, suites

    # Every check first.
    suite = suites.SUITES[args.suite]
    parts = _parts(args.only)
    _check_model(args.model)
    backends = _backends(args.backend) if "e2e" in parts else []
    previous = report.load(args.compare) if args.compare else None
    if args.plot:
        from anemll_fast.bench.plots import require_matplotlib

        require_matplotlib()
    units = tuple(args.compute_units) if args.compute_units else suite.compute_units
    suite = dataclasses.replace(suite, parts=tuple(parts), compute_units=units,
                                lut_baseline=suite.lut_baseline or args.lut)

    # --quiet for this run only: the flag is process-wide, and bench may run inside a longer-lived process.
    was_quiet = getattr(progress_mod, "_quiet", False)
    progress_mod.set_quiet(was_quiet or args.quiet)
    try:
        return _run_and_report(args, suite, backends, previous)
    finally:
        progress_mod.set_quiet(was_quiet)


def _run_and_report(args: argparse.Namespace, suite: Any, backends: List[str], previous: Any) -> int:
    from anemll_fast import progress as progress_mod
    from anemll_fast.bench import compare as compare_mod
    from anemll_fast.bench import report

    res = run(suite, args.model, backends)
    settings: Dict[str, Any] = {"suite": suite.name, "model": args.model or "default (SmolLM2-135M-Instruct)",
                                "backends": backends, **dataclasses.asdict(suite)}
    doc = report.document(res.figures, settings, res.notes)
    report.validate(doc)
    print(report.table(doc))
    ratios = None
    if previous is not None:
        ratios = compare_mod.compare(doc, previous)
        print()
        print(compare_mod.summary(ratios, previous.get("created", "")))
    if args.json:
        report.write_json(doc, args.json)
        progress_mod.note(f"results written to {args.json}")
    if args.plot:
        from anemll_fast.bench.plots import write_plots

        written = write_plots(doc, args.plot, ratios)
        progress_mod.note(f"{len(written)} plots written to {args.plot}")
    return 0


def run(suite: Any, model: Optional[str], backends: List[str]) -> Any:
    """The suite's parts, with a progress display on stderr (none when quiet or not a terminal)."""
    from anemll_fast import progress as progress_mod
    from anemll_fast.bench import suites

    res = suites.Results()
    with progress_mod.bar(desc="bench", unit="stage") as bar:
        def progress(message: str) -> None:
            bar.set_description_str(f"bench: {message}")
            bar.update(1)

        if "sampler" in suite.parts:
            suites.samplers(suite, res, progress)
        if "host" in suite.parts:
            suites.host_overhead(suite, res, progress)
        if "e2e" in suite.parts:
            for backend in backends:
                for units in (suite.compute_units if backend != "reference" else ("cpu_only",)):
                    suites.end_to_end(model, backend, units, suite, res, progress)
            if model is None:
                from anemll_fast.bench.versus import against_baselines

                against_baselines(suite, res, progress)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    from anemll_fast.cli import main as cli_main

    return cli_main(["bench"] + list(sys.argv[1:] if argv is None else argv))
