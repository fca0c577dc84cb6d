"""The results of a run: a JSON document (with the machine, OS, chip, CPU, versions and settings) and a
text table. SCHEMA_VERSION changes whenever a field changes meaning; `validate` is what `--compare` and
the tests check a document against."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from anemll_fast.bench import BenchError
from anemll_fast.bench.stats import Figure

SCHEMA = "anemll_fast.bench"
SCHEMA_VERSION = 1
FIGURE_KEYS = {"id": str, "group": str, "label": str, "unit": str, "better": str, "params": dict, "n": int,
               "min": (int, float), "median": (int, float), "max": (int, float), "noisy": bool, "samples": list}


def _sysctl(name: str) -> Optional[str]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_name() -> str:
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed (or no metadata): reported as absent
        return None


def machine_info() -> Dict[str, Any]:
    """What the figures were measured on."""
    from anemll_fast import __version__

    try:
        from anemll_fast import _native

        build = _native.build_info()
    except ImportError:
        build = {}
    from anemll_fast._kernels import kernel_isa

    chip = _sysctl("machdep.cpu.brand_string") if sys.platform == "darwin" else None
    return {
        "os": platform.system(), "os_version": platform.release(),
        "macos_version": platform.mac_ver()[0] or None, "arch": platform.machine(),
        "chip": chip, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(), "python": platform.python_version(),
        "versions": {"anemll_fast": __version__, "numpy": _version("numpy"), "coremltools": _version("coremltools"),
                     "matplotlib": _version("matplotlib")},
        "native_build": {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
                         for k, v in build.items()},
        "kernels": kernel_isa(),
        # Thread counts change the reference backend's figures most of all (BLAS threads spin on a busy machine).
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "VECLIB_MAXIMUM_THREADS", "ANEMLL_FAST_KERNELS")},
    }


def _memory_bytes() -> Optional[int]:
    if sys.platform == "darwin":
        text = _sysctl("hw.memsize")
        return int(text) if text and text.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def document(figures: List[Figure], settings: Dict[str, Any], notes: List[str]) -> Dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "settings": settings, "notes": list(notes),
            "figures": [f.to_dict() for f in figures]}


def validate(doc: Any, where: str = "results") -> Dict[str, Any]:
    """`doc` if it is a results document of this schema version, else BenchError naming what is wrong."""
    if not isinstance(doc, dict):
        raise BenchError(f"{where}: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise BenchError(f"{where}: not an anemll-fast bench result (schema {doc.get('schema')!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise BenchError(f"{where}: schema version {doc.get('schema_version')!r}, this anemll-fast reads "
                         f"{SCHEMA_VERSION}")
    for key in ("machine", "settings"):
        if not isinstance(doc.get(key), dict):
            raise BenchError(f"{where}: {key!r} missing or not an object")
    figures = doc.get("figures")
    if not isinstance(figures, list):
        raise BenchError(f"{where}: 'figures' missing or not a list")
    for i, fig in enumerate(figures):
        if not isinstance(fig, dict):
            raise BenchError(f"{where}: figures[{i}] is not an object")
        for key, kind in FIGURE_KEYS.items():
            if not isinstance(fig.get(key), kind) or isinstance(fig.get(key), bool) and kind is not bool:
                raise BenchError(f"{where}: figures[{i}] ({fig.get('id', '?')}): {key!r} missing or not "
                                 f"{getattr(kind, '__name__', 'a number')}")
        if not fig["min"] <= fig["median"] <= fig["max"]:
            raise BenchError(f"{where}: figures[{i}] ({fig['id']}): min <= median <= max does not hold")
    return doc


def load(path: str) -> Dict[str, Any]:
    """A results document from a file, validated (BenchError naming the file otherwise)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BenchError(f"--compare {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BenchError(f"--compare {path}: not JSON: {exc}") from exc
    return validate(doc, f"--compare {path}")


def write_json(doc: Dict[str, Any], path: str) -> None:
    p = Path(path)
    if p.parent and not p.parent.is_dir():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1) + "\n")


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def table(doc: Dict[str, Any]) -> str:
    """The figures as a text table, grouped, each with median [min .. max] and a noisy mark."""
    m = doc["machine"]
    lines = [f"anemll-fast bench ({doc['settings'].get('suite')} suite) on {m['os']} {m['arch']}, "
             f"{m.get('chip') or m['cpu']}, {m['cpu_count']} CPUs; anemll_fast {m['versions']['anemll_fast']}",
             "figures: median [min .. max] over n repetitions; '~' marks a noisy figure "
             "(spread > 50% of the median or n < 3)"]
    group = None
    width = max((len(f["label"]) for f in doc["figures"]), default=10)
    for f in doc["figures"]:
        if f["group"] != group:
            group = f["group"]
            lines.append(f"\n[{group}]")
        mark = "~" if f["noisy"] else " "
        lines.append(f"  {f['label']:{width}s} {mark}{_num(f['median']):>10s} {f['unit']:9s} "
                     f"[{_num(f['min'])} .. {_num(f['max'])}] n={f['n']}")
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
