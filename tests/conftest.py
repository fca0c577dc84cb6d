import sys
from pathlib import Path

# Test helpers (stub model builders) live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
