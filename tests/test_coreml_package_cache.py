"""The portable parts of the Core ML backend, compiled and run here: the compiled-model cache
(csrc/coreml/package_cache.h) and the strided, dtype-converting output copy (csrc/coreml/strided_copy.h).

The .mm that uses them only runs on macOS; these headers are plain C++17, so a small harness exercises
them on Linux too, against hashlib and numpy.
"""
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from anemll_fast.backends.coremltools_backend import content_digest

REPO = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or clang++)")

HARNESS = r"""
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include "coreml/package_cache.h"
#include "coreml/strided_copy.h"
#include "engine/alloc_hook.h"
using namespace anemll;
static std::vector<int64_t> ints(const std::string& s) {
  std::vector<int64_t> v; std::stringstream ss(s); std::string x;
  while (std::getline(ss, x, ',')) if (!x.empty()) v.push_back(std::stoll(x));
  return v;
}
static int32_t dt(const std::string& s) {
  return s == "f16" ? ANEMLL_DTYPE_FLOAT16 : s == "f32" ? ANEMLL_DTYPE_FLOAT32 : s == "f64" ? ANEMLL_DTYPE_FLOAT64
       : s == "i32" ? ANEMLL_DTYPE_INT32 : s == "i8" ? ANEMLL_DTYPE_INT8 : 0;
}
int main(int argc, char** argv) {
  if (argc < 2) return 2;
  std::string cmd = argv[1], err;
  if (cmd == "sha") {
    std::ifstream in(argv[2], std::ios::binary);
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::printf("%s\n", coreml_cache::sha256_hex(data).c_str());
    return 0;
  }
  if (cmd == "digest") {
    std::string hex;
    if (!coreml_cache::content_digest(argv[2], &hex, &err)) { std::printf("error: %s\n", err.c_str()); return 1; }
    std::printf("%s\n", hex.c_str());
    return 0;
  }
  if (cmd == "lookup" || cmd == "install") {
    coreml_cache::Lookup l;
    if (!coreml_cache::lookup(argv[2], argv[3], argv[4], &l, &err)) { std::printf("error: %s\n", err.c_str()); return 1; }
    if (cmd == "install" && !coreml_cache::install(argv[2], l, argv[5], &err)) { std::printf("error: %s\n", err.c_str()); return 1; }
    std::printf("%s\n%s\n%d\n%d\n", l.key.c_str(), l.compiled.c_str(), int(l.hit), int(l.hashed));
    return 0;
  }
  if (cmd == "root") {
    std::string root;
    if (!coreml_cache::default_root(&root, &err)) { std::printf("error: %s\n", err.c_str()); return 1; }
    std::printf("%s\n", root.c_str());
    return 0;
  }
  if (cmd == "copy" || cmd == "allocs") {  // src_file src_dtype shape strides dst_dtype shape strides dst_bytes out_file
    std::ifstream in(argv[2], std::ios::binary);
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::vector<int64_t> ss = ints(argv[4]), sst = ints(argv[5]), ds = ints(argv[7]), dst = ints(argv[8]);
    coreml_copy::Layout s, d;
    if (!coreml_copy::make_layout(dt(argv[3]), ss.data(), sst.data(), int32_t(ss.size()), data.size(), &s) ||
        !coreml_copy::make_layout(dt(argv[6]), ds.data(), dst.data(), int32_t(ds.size()), std::stoull(argv[9]), &d)) {
      std::printf("error: rank\n"); return 1;
    }
    std::vector<char> out(d.nbytes, 0);
    char msg[512];
    if (cmd == "allocs") {  // operator new calls made by 1000 plans and copies (success or refusal)
      set_alloc_counting(true);
      const uint64_t before = alloc_count();
      int ok = 0;
      for (int i = 0; i < 1000; ++i) {
        coreml_copy::Plan p;
        if (coreml_copy::plan(s, d, "output 'x'", &p, msg, sizeof msg)) { coreml_copy::run(p, data.data(), out.data()); ++ok; }
      }
      const uint64_t used = alloc_count() - before;
      set_alloc_counting(false);
      std::printf("%llu %d\n", (unsigned long long)used, ok);
      return 0;
    }
    if (!coreml_copy::copy(s, data.data(), d, out.data(), "output 'x'", msg, sizeof msg)) { std::printf("error: %s\n", msg); return 1; }
    std::ofstream(argv[10], std::ios::binary).write(out.data(), out.size());
    std::printf("ok\n");
    return 0;
  }
  if (cmd == "probe") {  // the hook counts this harness's allocations
    set_alloc_counting(true);
    const uint64_t before = alloc_count();
    std::vector<int64_t> v(ints(argv[2]));
    std::printf("%llu %zu\n", (unsigned long long)(alloc_count() - before), v.size());
    set_alloc_counting(false);
    return 0;
  }
  return 2;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    d = tmp_path_factory.mktemp("coreml_harness")
    src = d / "harness.cpp"
    src.write_text(HARNESS)
    exe = d / "harness"
    r = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{REPO / 'csrc'}", str(src),
                        str(REPO / "csrc" / "engine" / "alloc_hook.cpp"),
                        "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    def run(*args, env=None, check=True):
        p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **(env or {})})
        if check:
            assert p.returncode == 0, p.stdout + p.stderr
        return p
    return run


def _package(root: Path, weights: bytes = b"\x01\x02" * 1000) -> Path:
    pkg = root / "model.mlpackage"
    (pkg / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (pkg / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0"}')
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"spec bytes")
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(weights)
    return pkg


# ------------------------------------------------------------------ hashing
@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 1000, 1 << 16])
def test_sha256_matches_hashlib(harness, tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    f = tmp_path / "blob"
    f.write_bytes(data)
    assert harness("sha", f).stdout.strip() == hashlib.sha256(data).hexdigest()


def test_content_digest_agrees_with_python_and_ignores_mtime(harness, tmp_path):
    pkg = _package(tmp_path)
    native = harness("digest", pkg).stdout.strip()
    assert native == content_digest(pkg)
    os.utime(pkg / "Manifest.json", (1, 1))
    assert harness("digest", pkg).stdout.strip() == native
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(b"\x01\x03" * 1000)
    changed = harness("digest", pkg).stdout.strip()
    assert changed != native and changed == content_digest(pkg)
    single = tmp_path / "m.mlmodel"
    single.write_bytes(b"abc")
    assert harness("digest", single).stdout.strip() == content_digest(single)


def test_digest_refuses_symlinks_and_missing_paths(harness, tmp_path):
    pkg = _package(tmp_path)
    (pkg / "link").symlink_to(pkg / "Manifest.json")
    r = harness("digest", pkg, check=False)
    assert r.returncode == 1 and "link" in r.stdout and "symbolic" in r.stdout
    r = harness("digest", tmp_path / "nope.mlpackage", check=False)
    assert r.returncode == 1 and "nope.mlpackage" in r.stdout


# -------------------------------------------------------------------- cache
def test_lookup_hashes_once_then_uses_the_index(harness, tmp_path):
    pkg = _package(tmp_path)
    root = tmp_path / "cache"
    key, compiled, hit, hashed = harness("lookup", root, pkg, "macOS 15.1").stdout.split("\n")[:4]
    assert (hit, hashed) == ("0", "1")
    assert compiled == str(root / key / "model.mlmodelc")
    key2, _, hit, hashed = harness("lookup", root, pkg, "macOS 15.1").stdout.split("\n")[:4]
    assert (key2, hit, hashed) == (key, "0", "0")  # index hit: content not read again
    other, *_ = harness("lookup", root, pkg, "macOS 15.2").stdout.split("\n")
    assert other != key  # a new OS (new compiler) gets its own entry


def test_install_then_hit_and_changed_content_misses(harness, tmp_path):
    pkg = _package(tmp_path)
    root = tmp_path / "cache"
    compiled_src = tmp_path / "tmpcompile" / "model.mlmodelc"
    compiled_src.mkdir(parents=True)
    (compiled_src / "model.mil").write_text("program(1.3)")
    key, compiled, hit, _ = harness("install", root, pkg, "s", compiled_src).stdout.split("\n")[:4]
    assert hit == "0"
    assert (Path(compiled) / "model.mil").read_text() == "program(1.3)"
    assert not compiled_src.exists()  # moved, not copied
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]
    _, _, hit, hashed = harness("lookup", root, pkg, "s").stdout.split("\n")[:4]
    assert (hit, hashed) == ("1", "0")
    time.sleep(0.01)
    (pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(b"\x09" * 3000)
    key3, _, hit, hashed = harness("lookup", root, pkg, "s").stdout.split("\n")[:4]
    assert (hit, hashed) == ("0", "1") and key3 != key


def test_cache_root_from_env_and_home(harness, tmp_path):
    assert harness("root", env={"ANEMLL_FAST_COREML_CACHE": str(tmp_path / "c")}).stdout.strip() == str(tmp_path / "c")
    out = harness("root", env={"ANEMLL_FAST_COREML_CACHE": "", "XDG_CACHE_HOME": "", "HOME": str(tmp_path)}).stdout
    assert out.strip().startswith(str(tmp_path)) and out.strip().endswith("anemll_fast/coreml")


def test_unwritable_cache_names_the_directory(harness, tmp_path):
    pkg = _package(tmp_path)
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    r = harness("lookup", blocker / "cache", pkg, "s", check=False)
    assert r.returncode == 1 and "file_not_dir" in r.stdout


# --------------------------------------------------------------------- copy
NP = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i32": np.int32}


def _copy(harness, tmp_path, src: np.ndarray, dst_dtype: str, dst_shape, check=True):
    """Copies the strided view `src` (its own strides) into a dense array of dst_shape/dst_dtype."""
    base = src.base if src.base is not None else src
    f = tmp_path / "src.bin"
    f.write_bytes(np.ascontiguousarray(base).tobytes())
    item = src.dtype.itemsize
    offset = (src.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // item
    assert offset == 0
    strides = [s // item for s in src.strides]
    src_name = {v: k for k, v in NP.items()}[src.dtype.type]
    dst_strides = [int(np.prod(dst_shape[i + 1:])) for i in range(len(dst_shape))]
    nbytes = int(np.prod(dst_shape)) * np.dtype(NP[dst_dtype]).itemsize
    out = tmp_path / "dst.bin"
    r = harness("copy", f, src_name, ",".join(map(str, src.shape)), ",".join(map(str, strides)),
                dst_dtype, ",".join(map(str, dst_shape)), ",".join(map(str, dst_strides)), nbytes, out, check=check)
    if r.returncode:
        return r.stdout
    return np.frombuffer(out.read_bytes(), dtype=NP[dst_dtype]).reshape(dst_shape)


def test_copy_honours_padded_row_strides(harness, tmp_path):
    rng = np.random.default_rng(1)
    padded = rng.standard_normal((6, 40)).astype(np.float16)  # rows of 40, 32 used: like the ANE's 64-byte rows
    view = padded[:, :32]
    got = _copy(harness, tmp_path, view, "f16", [6, 32])
    np.testing.assert_array_equal(got, view)


def test_copy_converts_fp32_to_fp16_and_squeezes_unit_dims(harness, tmp_path):
    src = np.random.default_rng(2).standard_normal((1, 1, 3, 5)).astype(np.float32)
    got = _copy(harness, tmp_path, src, "f16", [1, 3, 5])
    np.testing.assert_array_equal(got, src.reshape(1, 3, 5).astype(np.float16))


def test_copy_transposed_source_and_int32(harness, tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    got = _copy(harness, tmp_path, a.T, "i32", [4, 3])  # a column-major view
    np.testing.assert_array_equal(got, a.T)
    d = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float64)
    np.testing.assert_allclose(_copy(harness, tmp_path, d, "f32", [2, 3]), d.astype(np.float32))


def test_copy_refuses_mismatches(harness, tmp_path):
    a = np.zeros((2, 3), dtype=np.float16)
    msg = _copy(harness, tmp_path, a, "f16", [3, 2], check=False)
    assert "output 'x'" in msg and "[2, 3]" in msg and "[3, 2]" in msg
    msg = _copy(harness, tmp_path, np.zeros((2, 3), np.int32), "f16", [2, 3], check=False)
    assert "INT32" in msg and "FLOAT16" in msg


def test_copy_refuses_strides_past_the_source(harness, tmp_path):
    f = tmp_path / "src.bin"
    f.write_bytes(b"\0" * 8)  # 4 fp16 values, but rows 8 apart claimed
    r = harness("copy", f, "f16", "2,4", "8,1", "f16", "2,4", "4,1", 16, tmp_path / "o", check=False)
    assert r.returncode == 1 and "source strides reach past" in r.stdout


# One decode step copies every output Core ML kept in its own memory: planning and copying must not allocate
# (counted with the engine's operator-new hook, linked into the harness).
@pytest.mark.parametrize("case", ["padded_rows_f16", "f32_to_f16", "transposed_i32", "refused_shape"])
def test_copy_path_allocates_nothing(harness, tmp_path, case):
    f = tmp_path / "src.bin"
    f.write_bytes(np.zeros(4096, np.float32).tobytes())
    args = {
        "padded_rows_f16": ("f16", "1,8,32", "320,40,1", "f16", "1,8,32", "256,32,1", 512),  # pixel-buffer rows
        "f32_to_f16": ("f32", "1,1,3,5", "15,15,5,1", "f16", "1,3,5", "15,5,1", 30),
        "transposed_i32": ("i32", "4,3", "1,4", "i32", "4,3", "3,1", 48),
        "refused_shape": ("f16", "2,3", "3,1", "f16", "3,2", "2,1", 12),
    }[case]
    used, ok = map(int, harness("allocs", f, *args, tmp_path / "o").stdout.split())
    assert used == 0, f"{used} operator new calls in 1000 plans and copies"
    assert ok == (0 if case == "refused_shape" else 1000)


def test_allocation_counter_sees_the_harness(harness):
    """Negative control: the hook linked into the harness does count (a std::vector allocates once)."""
    used, n = map(int, harness("probe", "1,2,3").stdout.split())
    assert n == 3 and used >= 1
