"""python -m anemll_fast.coreml_compat SCRIPT.py [ARGS...]: run a coremltools script on anemll_fast."""
from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

USAGE = "usage: python -m anemll_fast.coreml_compat SCRIPT.py [ARGS...]  (or -m MODULE [ARGS...])"


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + "\nRuns the script with coremltools' MLModel and CompiledMLModel replaced by anemll_fast's "
              "drop-in\n(native Core ML on macOS, the reference backend elsewhere; ANEMLL_FAST_BACKEND="
              "reference|coreml forces one).", file=sys.stderr if not args else sys.stdout)
        raise SystemExit(0 if args else 2)
    from anemll_fast.coreml_compat.files import backend_name
    from anemll_fast.coreml_compat.patch import patch_coremltools

    if args[0] == "-m" and len(args) < 2:
        raise SystemExit(USAGE)
    if args[0] != "-m" and not os.path.isfile(args[0]):
        raise SystemExit(f"anemll_fast.coreml_compat: no such script: {args[0]}")
    try:
        backend_name()  # a bad ANEMLL_FAST_BACKEND fails here, before the script starts
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"anemll_fast.coreml_compat: {e}") from None
    patch_coremltools()
    if args[0] == "-m":
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return
    script = args[0]
    sys.argv = args
    # As `python SCRIPT.py` does: the script's directory comes first on sys.path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
