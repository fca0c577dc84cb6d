import sys
from pathlib import Path

# Test helpers (stub model builders) live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Loaded-program cache entries of the models tests build go to a directory of
# this run, not the user's cache (set ANEMLL_FAST_PROGRAM_CACHE to override).
if "ANEMLL_FAST_PROGRAM_CACHE" not in __import__("os").environ:
    import atexit
    import os
    import shutil
    import tempfile

    os.environ["ANEMLL_FAST_PROGRAM_CACHE"] = tempfile.mkdtemp(prefix="anemll_fast_programs_")
    atexit.register(shutil.rmtree, os.environ["ANEMLL_FAST_PROGRAM_CACHE"], True)
