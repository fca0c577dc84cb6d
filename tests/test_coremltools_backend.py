"""anemll_fast.backends.coremltools_backend where it cannot run (off macOS): argument validation and a
clear CoreMLToolsUnavailable; the macOS behaviour is in test_coreml_backend.py."""
import sys

import pytest

from anemll_fast.backends import coremltools_backend as ctb
from anemll_fast.errors import AnemllError

off_macos = pytest.mark.skipif(sys.platform == "darwin", reason="checks the off-macOS refusal")


@pytest.fixture
def package(tmp_path):
    p = tmp_path / "tiny.mlpackage"
    (p / "Data").mkdir(parents=True)
    (p / "Manifest.json").write_text("{}")
    return p


@off_macos
def test_load_off_macos_says_why(package):
    with pytest.raises(ctb.CoreMLToolsUnavailable) as e:
        ctb.load(package, "infer", compute_units="cpu_and_ne")
    msg = str(e.value)
    assert "macOS" in msg and "tiny.mlpackage" in msg and "reference backend" in msg
    assert isinstance(e.value, AnemllError)


@off_macos
def test_backend_object_off_macos(package):
    backend = ctb.CoreMLToolsBackend("cpu_only")
    assert backend.compute_units == "cpu_only" and backend.name == "coremltools"
    with pytest.raises(ctb.CoreMLToolsUnavailable):
        backend.load(package)


@pytest.mark.parametrize("units", ["gpu", "", 3, None, "cpu+ne"])
def test_bad_compute_units(package, units):
    with pytest.raises(ctb.CoreMLToolsArgumentError) as e:
        ctb.load(package, compute_units=units)
    assert "compute_units" in str(e.value) and "cpu_and_ne" in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("units,expected", [("ALL", "all"), ("cpu_only", "cpu_only"), (" CPU_AND_NE ", "cpu_and_ne"),
                                            ("CPU_AND_GPU", "cpu_and_gpu")])
def test_compute_units_normalized(units, expected):
    assert ctb.normalize_compute_units(units) == expected


def test_compute_unit_enum_accepted():
    ct = pytest.importorskip("coremltools")
    assert ctb.normalize_compute_units(ct.ComputeUnit.CPU_AND_NE) == "cpu_and_ne"
    assert ctb.normalize_compute_units(ct.ComputeUnit.ALL) == "all"


def test_missing_path(tmp_path):
    with pytest.raises(ctb.CoreMLToolsArgumentError) as e:
        ctb.load(tmp_path / "absent.mlpackage")
    assert "absent.mlpackage" in str(e.value) and "no such file" in str(e.value)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ctb.CoreMLToolsArgumentError) as e:
        ctb.load(f)
    assert "weights.bin" in str(e.value) and ".mlpackage" in str(e.value)


def test_path_of_wrong_type():
    with pytest.raises(ctb.CoreMLToolsArgumentError) as e:
        ctb.load(123)
    assert "path" in str(e.value) and "int" in str(e.value)


@pytest.mark.parametrize("fn", ["", "   ", 5])
def test_bad_function_name(package, fn):
    with pytest.raises(ctb.CoreMLToolsArgumentError) as e:
        ctb.load(package, fn)
    assert "function_name" in str(e.value)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(ctb.CACHE_ENV, str(tmp_path))
    assert ctb.cache_root() == tmp_path / "coremltools"
    monkeypatch.delenv(ctb.CACHE_ENV)
    assert ctb.cache_root().parts[-4:] == ("Caches", "anemll_fast", "coreml", "coremltools")


def test_content_digest_depends_on_content_and_names(package):
    d0 = ctb.content_digest(package)
    (package / "Data" / "w.bin").write_bytes(b"\0\1")
    d1 = ctb.content_digest(package)
    (package / "Data" / "w.bin").write_bytes(b"\0\2")
    d2 = ctb.content_digest(package)
    (package / "Data" / "w.bin").rename(package / "Data" / "v.bin")
    d3 = ctb.content_digest(package)
    assert len({d0, d1, d2, d3}) == 4
