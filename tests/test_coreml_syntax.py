"""Every Objective-C++ file under csrc/ type-checks with clang.

Linux: against csrc/coreml/sdk_decls/apple_sdk_decls.h (declarations written from Apple's headers), since
no Apple SDK exists here, once per SDK the backend must build with: the macOS 15 SDK, the macOS 14.4 SDK
(no MLState API) and the macOS 14.0 SDK (no MLComputePlan either); `@available` is a run-time check, so
only a compile-time guard keeps a newer symbol out of an older SDK's build. macOS: against the real SDK,
with a macOS 13 deployment target and unguarded availability as an error, which checks every @available
guard.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
MM_FILES = sorted(CSRC.rglob("*.mm"))
CLANG = shutil.which("clang++")
IS_MACOS = sys.platform == "darwin"

pytestmark = pytest.mark.skipif(
    CLANG is None, reason="clang++ is not installed (Debian/Ubuntu: apt-get update && apt-get install -y clang)"
)

# ObjC++ as the backend is built (setup.py: -x objective-c++ -std=c++17 -fobjc-arc).
BASE = ["-fsyntax-only", "-x", "objective-c++", "-std=c++17", "-fobjc-arc", f"-I{CSRC}"]
if IS_MACOS:
    FLAGS = BASE + ["-mmacosx-version-min=13.0", "-Wall", "-Werror=unguarded-availability",
                    "-Werror=unguarded-availability-new", "-Werror=objc-method-access"]
else:
    # A Linux target has no Apple runtime: name the macOS one and enable blocks, as Apple's clang does.
    FLAGS = BASE + ["-fobjc-runtime=macosx-13.0", "-fblocks", "-DANEMLL_COREML_SDK_DECLS",
                    "-Wall", "-Wextra", "-Werror"]


# SDK variants of the declarations header (ANEMLL_SDK_DECLS_MACOS); the real SDK on macOS.
SDKS = {"real-sdk": []} if IS_MACOS else {
    "macos15-sdk": ["-DANEMLL_SDK_DECLS_MACOS=150000"],
    "macos14.4-sdk": ["-DANEMLL_SDK_DECLS_MACOS=140400"],
    "macos14-sdk": ["-DANEMLL_SDK_DECLS_MACOS=140000"],
}


def _clang(path: Path, sdk: str = next(iter(SDKS))):
    return subprocess.run([CLANG, *FLAGS, *SDKS[sdk], str(path)], capture_output=True, text=True, timeout=300)


def test_there_is_objective_cpp_to_check():
    assert MM_FILES, "no csrc/**/*.mm found"
    assert CSRC / "coreml" / "coreml_backend.mm" in MM_FILES


@pytest.mark.parametrize("sdk", list(SDKS))
@pytest.mark.parametrize("path", MM_FILES, ids=[str(p.relative_to(REPO)) for p in MM_FILES])
def test_mm_file_type_checks(path, sdk):
    r = _clang(path, sdk)
    assert r.returncode == 0, f"clang++ {' '.join(FLAGS + SDKS[sdk])} {path}\n{r.stdout}{r.stderr}"


@pytest.mark.skipif(IS_MACOS, reason="the SDK variants are those of the declarations header")
@pytest.mark.parametrize("symbol,use", [
    ("newState", "if (@available(macOS 15.0, *)) { (void)[m newState]; }"),
    ("functionName", "if (@available(macOS 15.0, *)) { m.configuration.functionName = nil; }"),
    ("stateDescriptionsByName", "if (@available(macOS 15.0, *)) { (void)m.modelDescription.stateDescriptionsByName; }"),
])
def test_macos15_symbol_outside_the_compile_time_guard_fails_the_macos14_sdk(tmp_path, symbol, use):
    """@available alone is not enough: the same code passes against the macOS 15 declarations (control) and
    fails against the macOS 14 SDK variant, naming the symbol."""
    bad = tmp_path / "unguarded.mm"
    src = (CSRC / "coreml" / "coreml_backend.mm").read_text()
    bad.write_text(src.replace('#include "coreml/', f'#include "{CSRC}/coreml/')
                   + f"\nvoid anemll_planted_unguarded(MLModel* m) {{ {use} }}\n")
    assert _clang(bad, "macos15-sdk").returncode == 0
    r = _clang(bad, "macos14.4-sdk")
    assert r.returncode != 0
    assert symbol in r.stderr


def test_check_catches_a_misspelt_selector(tmp_path):
    """The check can fail: a selector Core ML does not have is an error (ARC forbids undeclared selectors)."""
    bad = tmp_path / "bad.mm"
    src = (CSRC / "coreml" / "coreml_backend.mm").read_text()
    assert "getBytesWithHandler:" in src
    bad.write_text(src.replace('#include "coreml/', f'#include "{CSRC}/coreml/').replace(
        "getBytesWithHandler:", "getBytesWithHandlr:"))
    r = _clang(bad)
    assert r.returncode != 0
    assert "getBytesWithHandlr" in r.stderr


@pytest.mark.skipif(IS_MACOS, reason="the declarations header is only used off macOS")
def test_check_catches_a_wrong_argument_type(tmp_path):
    """Signatures are checked, not just names: passing an int where Core ML wants an NSURL fails."""
    bad = tmp_path / "bad_type.mm"
    bad.write_text(
        '#include "coreml/sdk_decls/apple_sdk_decls.h"\n'
        "void f(MLModelConfiguration* c) {\n"
        "  NSError* e = nil;\n"
        "  (void)[MLModel modelWithContentsOfURL:42 configuration:c error:&e];\n"
        "}\n"
    )
    r = _clang(bad)
    assert r.returncode != 0
    assert "modelWithContentsOfURL" in r.stderr or "incompatible" in r.stderr


@pytest.mark.skipif(IS_MACOS, reason="the declarations header is only used off macOS")
def test_declarations_header_refuses_apple_platforms():
    text = (CSRC / "coreml" / "sdk_decls" / "apple_sdk_decls.h").read_text()
    assert "#if defined(__APPLE__)" in text and "#error" in text
