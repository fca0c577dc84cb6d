"""Plots of a results document with matplotlib (the optional `[bench]` extra): tokens/s against prompt
length, the per-part breakdown per token (stacked bars), anemll_fast against the chat.py-style loop,
sampler costs beside the read floor, host overhead per layout, and the ratios of `--compare`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from anemll_fast.bench import BenchError
from anemll_fast.bench.stats import ROBUST_FROM

EXTRA_HINT = "pip install 'anemll_fast[bench]'"


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or BenchError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BenchError(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from exc
    return plt


def _by(figs: List[Dict[str, Any]], prefix: str) -> List[Dict[str, Any]]:
    return [f for f in figs if f["id"].startswith(prefix)]


def _err(figs: List[Dict[str, Any]]) -> List[List[float]]:
    """Whiskers from the median: to the 10th and 90th percentiles when there are many samples (a step
    preempted by another process would otherwise hide every other), else to min and max."""
    lo, hi = [], []
    for f in figs:
        a, b = (np.percentile(f["samples"], [10, 90]) if len(f["samples"]) >= ROBUST_FROM else (f["min"], f["max"]))
        lo.append(max(f["median"] - float(a), 0.0))
        hi.append(max(float(b) - f["median"], 0.0))
    return [lo, hi]


def write_plots(doc: Dict[str, Any], out_dir: str, ratios: Optional[List[Any]] = None) -> List[Path]:
    """PNG files in out_dir, one per kind of figure present; returns their paths."""
    plt = require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = doc["figures"]
    written: List[Path] = []
    machine = doc["machine"]
    where = f"{machine['os']} {machine['arch']}, {machine['cpu_count']} CPUs"

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    tags = sorted({f["id"].split("/")[1] for f in _by(figs, "e2e/") if "/prefill/" in f["id"]})
    if tags:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for tag in tags:
            for ax, kind in zip(axes, ("prefill", "decode")):
                fs = _by(figs, f"e2e/{tag}/{kind}/")
                xs = [f["params"]["prompt"] for f in fs]
                ax.errorbar(xs, [f["median"] for f in fs], yerr=_err(fs), marker="o", capsize=3, label=tag)
                ax.set_xlabel("prompt length (tokens)")
                ax.set_ylabel("tokens/s")
                ax.set_title(f"{kind} ({where})")
                ax.set_xscale("log", base=2)
        axes[0].legend()
        save(fig, "tokens_per_s.png")

        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tags) + 3), 4.5))
        for i, tag in enumerate(tags):
            bottom = 0.0
            parts = _by(figs, f"breakdown/{tag}/")
            for f in parts:
                ax.bar(i, f["median"], bottom=bottom, label=f["params"]["part"] if i == 0 else None)
                bottom += f["median"]
            # The engine's own share is often too thin to see: say it.
            own = sum(f["median"] for f in parts if f["params"]["part"] in ("sampler", "host"))
            ax.annotate(f"sampler + host: {1e3 * own:.0f} us", (i, bottom), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(tags)), tags)
        ax.set_ylabel("ms per token")
        ax.set_title("where the time of a decode step goes (medians)")
        ax.legend(fontsize=8)
        save(fig, "breakdown.png")

    def ratio_bars(rs: List[Dict[str, Any]], labels: List[str], ylabel: str, title: str, name: str) -> None:
        """Ratio figures as bars with whiskers, beside the line at 1 (parity)."""
        if not rs:
            return
        fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(rs) + 2), 4))
        ax.bar(range(len(rs)), [f["median"] for f in rs], yerr=_err(rs), capsize=4)
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xticks(range(len(rs)), labels, fontsize=8, rotation=20 if len(rs) > 4 else 0)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        save(fig, name)

    vs = [f for f in _by(figs, "vs_chatpy/") if f["id"].endswith("/ratio")]
    ratio_bars(vs, [f["id"].split("/")[1] for f in vs], "decode speed, anemll_fast / chat.py loop",
               "against the chat.py-style Python loop (same backend)", "vs_chatpy.png")
    # baselines/<model>/<decode|prefill>_vs/<baseline>
    vb = [f for f in _by(figs, "baselines/") if "_vs/" in f["id"]]
    ratio_bars(vb, [f"{f['params']['model']} {f['id'].split('/')[-2][:-3]}\nvs {f['id'].split('/')[-1]}"
                    for f in vb], "anemll_fast reference / baseline",
               "against PyTorch / llama.cpp (same weights, one thread)", "vs_baselines.png")

    vocabs = sorted({f["params"]["vocab"] for f in _by(figs, "sampler/")})
    if vocabs:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(vocabs)
        for k, vocab in enumerate(vocabs):
            fs = _by(figs, f"sampler/{vocab}/")
            ax.bar([i + k * width for i in range(len(fs))], [f["median"] for f in fs], width, yerr=_err(fs),
                   capsize=2, label=f"vocabulary {vocab:,}")
            names = [f["params"].get("chain", "read floor") for f in fs]
        ax.set_xticks([i + width * (len(vocabs) - 1) / 2 for i in range(len(names))], names, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("microseconds per token")
        ax.set_title("sampler chains over 16 fp16 logits parts (median, whiskers 10th-90th percentile)")
        ax.legend()
        save(fig, "samplers.png")

    hosts = [f for f in _by(figs, "host/") if "chain" in f["params"]]
    if hosts:
        layouts = list(dict.fromkeys(f["params"]["layout"] for f in hosts))
        chains = list(dict.fromkeys(f["params"]["chain"] for f in hosts))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / (len(chains) + 1)
        for k, chain in enumerate(chains + ["floor"]):
            fs = [f for lay in layouts for f in figs if f["id"] == f"host/{lay}/{chain}"]
            ax.bar([i + k * width for i in range(len(fs))], [f["median"] for f in fs], width, yerr=_err(fs),
                   capsize=2, label="read the logits once" if chain == "floor" else chain)
        ax.set_xticks([i + width * len(chains) / 2 for i in range(len(layouts))], layouts)
        ax.set_yscale("log")
        ax.set_ylabel("microseconds per decode step")
        ax.set_title(f"host overhead on the null backend ({where}; median, whiskers 10th-90th percentile)",
                     fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "host_overhead.png")

    if ratios:
        fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * len(ratios) + 1)))
        colors = ["tab:red" if r.regression else ("tab:grey" if r.noisy else "tab:green") for r in ratios]
        ax.barh(range(len(ratios)), [r.ratio for r in ratios], color=colors)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_yticks(range(len(ratios)), [r.label for r in ratios], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("ratio to the earlier run (> 1 better; red: regression, grey: noisy)")
        save(fig, "compare.png")
    return written
