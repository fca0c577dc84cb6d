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


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _thaw_after_each_test():
    """A model load freezes what exists at its end (gc.freeze, see anemll_fast.gc_pause): thawed after each
    test, so that the cyclic garbage a test leaves (tracebacks, fixtures) is collected as before."""
    yield
    gc.unfreeze()
