"""Build a C++ driver of the kernels for aarch64 and run it under qemu (the NEON paths, a Mac's CPU path)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_neon_driver(tmp_path: Path, source: str, *kernel_files: str) -> None:
    """Compile `source` with csrc/kernels/<kernel_files> statically for aarch64, run it under qemu and
    require it to print "ok" (skips where the cross compiler or qemu is absent)."""
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is absent")
    src = tmp_path / "neon_driver.cpp"
    src.write_text(source)
    exe = tmp_path / "neon_driver"
    build = subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O2", "-static", f"-I{REPO / 'csrc'}", str(src),
                            *(str(REPO / "csrc" / "kernels" / f) for f in kernel_files), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    r = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.stdout, r.stderr)
