"""What `pip install anemll_fast` gets: the sdist carries every file the build needs, a wheel built from that
sdist alone (not from this checkout) installs into a fresh virtual environment, and the installed package runs.

Build dependencies come from the running environment (`--no-build-isolation`, a venv with
`--system-site-packages`): the dev extra installs them, so this runs offline and without downloading numpy and
Cython again for every run (an isolated build adds that download to the ~30 s the compile takes).
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from anemll_fast import __version__
from anemll_fast.testing.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
IS_LINUX = sys.platform.startswith("linux")

pytestmark = pytest.mark.slow

# Not part of a source tree anyone would publish (build output, caches, VCS).
_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".pytest_cache", "__pycache__",
                                     ".hypothesis", "*.whl", "*.tar.gz")


def _run(cmd, cwd, timeout=900, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _tracked_native_sources():
    """Every native source of the checkout (git's list where there is one)."""
    try:
        out = subprocess.run(["git", "ls-files", "csrc"], cwd=REPO, capture_output=True, text=True, check=True)
        files = [line for line in out.stdout.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = []
    return files or [str(p.relative_to(REPO)) for p in (REPO / "csrc").rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """sdist of a copy of this tree (its build leftovers included: they must stay out), then a wheel built from
    that sdist alone, in a fresh virtual environment."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    # Running setup.py cythonizes: src/anemll_fast/_native.cpp exists while the sdist is made, and must stay out.
    out = tmp / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, src], cwd=tmp)
    (sdist,) = out.glob("*.tar.gz")

    venv = tmp / "venv"
    # No pip inside the venv: the outer environment's pip (visible through the system site-packages) installs
    # into the venv's prefix, which saves the seconds ensurepip takes.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    wheels = tmp / "wheels"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("ANEMLL_FAST_KEEP_SYMBOLS", None)
    _run([py, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", wheels, sdist], cwd=tmp,
         env=env)
    (wheel,) = wheels.glob("anemll_fast-*.whl")
    _run([py, "-m", "pip", "install", "--no-deps", wheel], cwd=tmp, env=env)
    return {"sdist": sdist, "wheel": wheel, "python": py, "venv": venv, "tmp": tmp}


def test_sdist_carries_every_native_source_and_no_generated_file(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = tar.getnames()
    root = names[0].split("/")[0]
    assert root == f"anemll_fast-{__version__}"
    rel = {n[len(root) + 1:] for n in names if n.startswith(root + "/")}
    missing = [f for f in _tracked_native_sources() if f not in rel]
    assert not missing, f"the sdist lacks {missing}"
    for needed in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "anemll_fast/_native.pyx",
                   "anemll_fast/_engine_api.pxd", "anemll_fast/py.typed", "csrc/engine/fp16.h",
                   "csrc/coreml/coreml_backend.mm", "csrc/coreml/sdk_decls/apple_sdk_decls.h"):
        assert needed in rel, needed
    assert not {"anemll_fast/_native.cpp", "anemll_fast/_kernels.cpp"} & rel, \
        "the Cython output must be generated at build time"
    assert not any(n.endswith((".so", ".o", ".pyc", ".dylib")) for n in rel)


def test_wheel_metadata_licence_and_version(dists):
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
    assert f"Version: {__version__}" in meta
    assert "License :: OSI Approved :: MIT License" in meta
    assert "Project-URL:" in meta and "Requires-Python: >=3.9" in meta
    assert any(n.endswith(".dist-info/LICENSE") or "/licenses/LICENSE" in n for n in names)
    for ext in ("_native", "_kernels"):
        assert any(n.startswith(f"anemll_fast/{ext}") and n.endswith((".so", ".pyd")) for n in names), ext
    assert not any(n in ("anemll_fast/_native.cpp", "anemll_fast/_kernels.cpp") or n.startswith("csrc/")
                   for n in names)


@pytest.mark.skipif(not IS_LINUX, reason="the symbol table check reads ELF (Apple's ld drops local symbols: -Wl,-x)")
def test_wheel_extension_is_stripped(dists, tmp_path):
    if not (shutil.which("nm") or shutil.which("file")):
        pytest.skip("neither nm nor file is installed")
    for ext in ("_native", "_kernels"):
        with zipfile.ZipFile(dists["wheel"]) as z:
            so = next(n for n in z.namelist() if n.startswith(f"anemll_fast/{ext}") and n.endswith(".so"))
            path = Path(z.extract(so, tmp_path))
        if shutil.which("nm"):
            r = subprocess.run(["nm", path], capture_output=True, text=True)
            assert "no symbols" in r.stderr, f"symbols left in {so}: {r.stdout[:300]}"
            # Only the dynamic symbols the interpreter needs remain exported.
            dyn = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout
            assert f"PyInit_{ext}" in dyn
        else:
            assert ", stripped" in subprocess.run(["file", path], capture_output=True, text=True).stdout


def test_installed_wheel_imports_and_generates(dists, tmp_path):
    """The wheel's own files run (not this checkout's): import, the CLI's --version, one generation."""
    tiny = build_tiny_model(tmp_path / "tiny", arch="llama", context_length=32, batch_size=8, seed=3)
    prompt = [5, 6, 7, 8, 9]
    expected = tiny.reference().greedy(prompt, 4)
    script = (
        "import json, anemll_fast, anemll_fast._native as n\n"
        "m = anemll_fast.load(%r, backend='reference')\n"
        "toks = [r.token for r in anemll_fast.stream_generate(m, %r, max_tokens=4) if r.token is not None]\n"
        "print(json.dumps({'file': anemll_fast.__file__, 'native': n.__file__, 'tokens': toks,\n"
        "                  'text': anemll_fast.generate(m, %r, max_tokens=4)}))\n"
    ) % (str(tiny.path), prompt, prompt)
    run_dir = tmp_path / "elsewhere"  # not the checkout: its anemll_fast must not shadow the installed one
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = _run([dists["python"], "-c", script], cwd=run_dir, env=env, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    venv = str(dists["venv"].resolve())
    assert out["file"].startswith(venv) and out["native"].startswith(venv), out
    assert out["tokens"] == expected[: len(out["tokens"])] and out["tokens"]
    assert isinstance(out["text"], str)
    cli = dists["venv"] / "bin" / "anemll-fast"
    v = _run([cli, "--version"], cwd=run_dir, env=env, timeout=120)
    assert v.stdout.startswith(f"anemll-fast {__version__} (native engine")
