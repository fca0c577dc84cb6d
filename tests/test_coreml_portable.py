"""The parts of both Core ML backends that run anywhere, run here: the native backend's option checks and its
"not built in" refusal, and the coremltools backend's spec I/O, compiled-model cache (with a fake
coremltools standing in for the compiler), predict checks and macOS version gates. Core ML itself runs in
test_coreml_backend.py, on macOS."""
from __future__ import annotations

import sys
import types as pytypes

import numpy as np
import pytest

from anemll_fast import _native
from anemll_fast.backends import coremltools_backend as ctb
from anemll_fast.testing.tiny import build_tiny_model

ct = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("portable") / "m", context_length=16, batch_size=4,
                            vocab_size=300, num_layers=1, split_lm_head=2)


# ------------------------------------------------------------------ the native backend
@pytest.mark.parametrize("kw, culprit", [
    (dict(compute_units="gpu_only"), "compute_units"), (dict(compute_units=3), "compute_units"),
    (dict(output_backing="surface"), "output_backing"), (dict(output_backing=None), "output_backing"),
])
def test_native_coreml_options_are_checked_first(kw, culprit):
    with pytest.raises(ValueError, match=culprit):
        _native.CoreMLBackend(**kw)


@pytest.mark.skipif(_native.build_info()["coreml_backend"], reason="this build has the Core ML backend")
@pytest.mark.parametrize("units", ["cpu_only", "cpu_and_gpu", "all", "cpu_and_ne"])
def test_native_coreml_not_built_in_says_so(units, tmp_path):
    with pytest.raises(RuntimeError, match="not built in.*macOS"):
        _native.CoreMLBackend(compute_units=units, output_backing="pixel_buffer", cache_dir=tmp_path)


# ------------------------------------------------------------------ spec I/O (skip_model_load works on Linux)
def test_spec_io_of_each_function(tiny):
    chunk = tiny.path / "llama_FFN_PF_chunk_01of01.mlpackage"
    model = ct.models.MLModel(str(chunk), skip_model_load=True)
    state = ["model_model_kv_cache_0"]
    ins = ["hidden_states", "position_ids", "causal_mask", "current_pos"]
    for fn in ("infer", "prefill", None):  # None: the default function (ANEMLL's is infer)
        i, o, s = ctb._spec_io(model, fn)
        assert sorted(i) == sorted(ins) and o == ["output_hidden_states"] and s == state, fn
    head = ct.models.MLModel(str(tiny.path / "llama_lm_head.mlpackage"), skip_model_load=True)
    assert ctb._spec_io(head, None) == (["hidden_states"], ["logits1", "logits2"], [])

    class Unreadable:
        def get_spec(self):
            raise RuntimeError("no spec")

    assert ctb._spec_io(Unreadable(), "infer") == ([], [], [])


# ------------------------------------------------------------------ the compiled-model cache
class FakeCoremltools(pytypes.SimpleNamespace):
    """coremltools as far as load() uses it: spec reading is the real one, compiling and loading are fakes."""

    def __init__(self):
        compiled = []

        def compile_model(src, destination_path):
            compiled.append(src)
            from pathlib import Path

            Path(destination_path).mkdir(parents=True)
            (Path(destination_path) / "model.mil").write_text(f"compiled from {src}\n")
            return destination_path

        class CompiledMLModel:
            def __init__(self, path, compute_units=None, function_name=None):
                self.path, self.compute_units, self.function_name = path, compute_units, function_name

            def predict(self, feed, state=None):
                return {"echo": next(iter(feed.values())), "state": np.array([state is not None])}

            def make_state(self):
                return object()

        super().__init__(__version__="fake-9", compiled=compiled, utils=pytypes.SimpleNamespace(compile_model=compile_model),
                         models=pytypes.SimpleNamespace(MLModel=ct.models.MLModel, CompiledMLModel=CompiledMLModel),
                         ComputeUnit=ct.ComputeUnit)


@pytest.fixture
def fake_macos(monkeypatch, tmp_path):
    fake = FakeCoremltools()
    monkeypatch.setitem(sys.modules, "coremltools", fake)
    monkeypatch.setattr(ctb, "macos_version", lambda: (15, 1))
    monkeypatch.setenv(ctb.CACHE_ENV, str(tmp_path / "cache"))
    return fake


def test_load_compiles_a_package_once_per_content(tiny, fake_macos, tmp_path):
    import shutil

    chunk = tmp_path / "chunk.mlpackage"
    shutil.copytree(tiny.path / "llama_FFN_PF_chunk_01of01.mlpackage", chunk)
    m = ctb.load(chunk, "prefill", compute_units="cpu_and_ne")
    assert m._model.function_name == "prefill" and m._model.compute_units == ct.ComputeUnit.CPU_AND_NE
    assert m.state_names == ["model_model_kv_cache_0"] and "causal_mask" in m.input_names
    assert m._model.path.endswith("chunk.mlmodelc") and str(ctb.cache_root()) in m._model.path
    ctb.load(chunk, "infer")
    assert fake_macos.compiled == [str(chunk)]  # the second function reuses the compiled model
    entries = sorted(p.name for p in ctb.cache_root().iterdir())
    assert len(entries) == 1 and not [e for e in entries if e.startswith(".staging-")]
    # Different content, different key: compiled again, next to the first.
    weights = next(chunk.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    ctb.load(chunk, "infer")
    assert len(fake_macos.compiled) == 2 and len(list(ctb.cache_root().iterdir())) == 2
    # A compiled .mlmodelc is loaded as is.
    compiled = m._model.path
    assert ctb.load(compiled)._model.path == compiled and len(fake_macos.compiled) == 2


def test_failed_compile_leaves_no_cache_entry(tiny, fake_macos):
    def broken(src, destination_path):
        raise RuntimeError("compiler crashed")

    fake_macos.utils.compile_model = broken
    with pytest.raises(ctb.CoreMLToolsError, match="compiler crashed"):
        ctb.load(tiny.path / "llama_lm_head.mlpackage")
    assert not list(ctb.cache_root().iterdir())


# ------------------------------------------------------------------ predict checks
def test_predict_checks_inputs_and_state(tiny, fake_macos):
    m = ctb.load(tiny.path / "llama_FFN_PF_chunk_01of01.mlpackage", "infer")
    feed = {n: np.zeros(1, np.float16) for n in m.input_names}
    with pytest.raises(ctb.CoreMLToolsArgumentError, match="dict"):
        m.predict([1, 2])
    with pytest.raises(ctb.CoreMLToolsArgumentError, match=r"unexpected inputs \['bogus'\]"):
        m.predict({**feed, "bogus": np.zeros(1)}, m.make_state())
    with pytest.raises(ctb.CoreMLToolsArgumentError, match=r"missing inputs \['position_ids'\]"):
        m.predict({k: v for k, v in feed.items() if k != "position_ids"}, m.make_state())
    with pytest.raises(ctb.CoreMLToolsArgumentError, match="make_state"):
        m.predict(feed)
    assert m.predict(feed, m.make_state())["state"][0]
    head = ctb.load(tiny.path / "llama_lm_head.mlpackage")
    with pytest.raises(ctb.CoreMLToolsArgumentError, match="no state"):
        head.make_state()

    def failing(feed, state=None):
        raise ValueError("bad shape")

    head._model.predict = failing
    with pytest.raises(ctb.CoreMLToolsError, match="prediction failed: bad shape"):
        head.predict({"hidden_states": np.zeros((1, 1, 64), np.float16)})


# ------------------------------------------------------------------ macOS version gates
@pytest.mark.parametrize("mac_ver, expected", [("15.1", (15, 1)), ("13.6.4", (13, 6, 4)), ("", ()), ("x.y", None)])
def test_macos_version_parsing(monkeypatch, mac_ver, expected):
    monkeypatch.setattr(ctb.sys, "platform", "darwin")
    monkeypatch.setattr(ctb.platform, "mac_ver", lambda: (mac_ver, ("", "", ""), "arm64"))
    assert ctb.macos_version() == expected


@pytest.mark.parametrize("version, function, error", [
    ((12, 7), None, "macOS 13 or newer; this is macOS 12.7"),
    ((14, 6), "infer", "needs macOS 15; this is macOS 14.6"),
    ((13, 0), None, None), ((14, 6), None, None), ((15, 0), "infer", None),
])
def test_macos_version_gates(monkeypatch, tmp_path, version, function, error):
    monkeypatch.setattr(ctb, "macos_version", lambda: version)
    if error is None:
        assert ctb._require_macos(tmp_path, function) == version
    else:
        with pytest.raises(ctb.CoreMLToolsUnavailable, match=error.replace(".", r"\.")):
            ctb._require_macos(tmp_path, function)
