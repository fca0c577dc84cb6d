"""Core ML against the reference backend, on tiny converted models (macOS only).

Both Core ML backends are checked: the pure-Python one on coremltools, component by component and through
the native engine, and the native Objective-C++ one (when the extension exposes it) through the engine.
Outputs must agree with the reference CPU interpreter within fp16 tolerance; generated tokens must agree
wherever the reference's choice is not a near tie.
"""
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs only on macOS")

if sys.platform == "darwin":
    from anemll_fast.backends import coremltools_backend as ctb
    from anemll_fast.backends.reference import ReferenceBackend
    from anemll_fast.config import ModelConfig
    from anemll_fast.testing.tiny import build_tiny_model

CONTEXT = 32
BATCH = 8
VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("coreml_tiny") / "m", num_chunks=2, context_length=CONTEXT,
                            batch_size=BATCH, vocab_size=VOCAB, seed=3)


@pytest.fixture(scope="module")
def config(tiny):
    return ModelConfig.from_anemll_dir(tiny.path)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ANEMLL_FAST_COREML_CACHE", str(tmp_path_factory.getbasetemp() / "coreml_cache"))


def _inputs(model, rng):
    """Plausible inputs for every declared input of a reference model (shape: first accepted)."""
    out = {}
    for spec in model.input_specs:
        shape = tuple(spec.enumerated[0]) if spec.enumerated else tuple(1 if d is None else int(d) for d in spec.shape)
        if spec.dtype in ("int32", "int64", "int16", "int8", "uint8"):
            high = VOCAB if "ids" in spec.name else 4
            out[spec.name] = rng.integers(0, high, size=shape).astype(np.int32)
        elif "mask" in spec.name:
            out[spec.name] = np.zeros(shape, dtype=np.float16)
        else:
            out[spec.name] = (rng.standard_normal(shape) * 0.5).astype(np.float16)
    return out


def _close(got, want, what):
    got = np.asarray(got, dtype=np.float32).reshape(np.asarray(want).shape)
    want = np.asarray(want, dtype=np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=3e-2 * scale, rtol=3e-2, err_msg=what)


@pytest.mark.parametrize("units", ["cpu_only", "all"])
def test_coremltools_components_match_reference(config, units):
    rng = np.random.default_rng(0)
    ref_state = ct_state = None
    for label, comp in config.components():
        path = str(config.path_of(comp))
        fn = comp.function or None
        ref = ReferenceBackend.load(path, fn)
        cm = ctb.load(path, fn, compute_units=units)
        inputs = _inputs(ref, rng)
        if ref.state_specs:
            ref_state, ct_state = ref.make_state(), cm.make_state()
        want = ref.predict(inputs, ref_state if ref.state_specs else None)
        got = cm.predict(inputs, ct_state if ref.state_specs else None)
        for name, value in want.items():
            _close(got[name], value, f"{label} ({units}): output {name}")


def test_coremltools_compiles_a_package_once(config, tmp_path, monkeypatch):
    monkeypatch.setenv("ANEMLL_FAST_COREML_CACHE", str(tmp_path / "c"))
    comp = config.lm_head
    ctb.load(config.path_of(comp), comp.function or None)
    entries = list((tmp_path / "c" / "coremltools").iterdir())
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    ctb.load(config.path_of(comp), comp.function or None)
    assert [e.stat().st_mtime_ns for e in (tmp_path / "c" / "coremltools").iterdir()] == [stamp]


def test_coremltools_rejects_unknown_function(config):
    comp = config.ffn_infer[0]
    with pytest.raises(ctb.CoreMLToolsError) as e:
        ctb.load(config.path_of(comp), "no_such_function")
    assert "no_such_function" in str(e.value)


def _generate_both(config, backend, prompt, n):
    from anemll_fast.engine import Engine

    out = []
    for b in ("reference", backend):
        with Engine(config, b) as eng:
            tokens, logits = [], []
            for t in eng.generate_tokens(prompt, n):
                tokens.append(t)
                logits.append(eng.logits().astype(np.float32))
            out.append((tokens, logits))
    return out


def _agree(ref, other):
    (rt, rl), (ot, ol) = ref, other
    assert len(rt) == len(ot)
    for i, (a, b, la, lb) in enumerate(zip(rt, ot, rl, ol)):
        _close(lb, la, f"step {i} logits")
        top2 = np.sort(la)[-2:]
        if top2[1] - top2[0] > 0.05 * max(1.0, abs(top2[1])):  # not a near tie: the choice must agree
            assert a == b, f"step {i}: reference chose {a}, Core ML {b}"
        if a != b:
            break  # after a tie went the other way the sequences legitimately differ


def test_engine_with_coremltools_backend_matches_reference(config):
    prompt = list(range(5, 5 + BATCH + 3))  # longer than one prefill batch
    ref, cm = _generate_both(config, ctb.CoreMLToolsBackend("cpu_only"), prompt, 6)
    _agree(ref, cm)


def _native_coreml():
    from anemll_fast import _native

    cls = getattr(_native, "CoreMLBackend", None)
    if cls is None or not _native.build_info().get("coreml_backend"):
        pytest.skip("this build of anemll_fast._native does not expose CoreMLBackend")
    return cls


@pytest.mark.parametrize("units,backing", [("cpu_only", "multiarray"), ("all", "auto"), ("cpu_and_ne", "pixel_buffer"),
                                           ("all", "none")])
def test_engine_with_native_coreml_backend_matches_reference(config, units, backing):
    cls = _native_coreml()
    backend = cls(compute_units=units, output_backing=backing)
    prompt = list(range(7, 7 + BATCH + 2))
    ref, cm = _generate_both(config, backend, prompt, 6)
    _agree(ref, cm)
    stats = backend.stats()
    assert stats["predictions"] > 0
    assert stats["outputs_in_place"] + stats["outputs_copied"] > 0


def test_native_coreml_reset_and_reuse(config):
    from anemll_fast.engine import Engine

    cls = _native_coreml()
    backend = cls(compute_units="cpu_only")
    with Engine(config, backend) as eng:
        first = eng.generate([3, 4, 5, 6], 4)
        eng.reset()
        again = eng.generate([3, 4, 5, 6], 4, start=0)
    assert first == again
    assert backend.stats()["state_resets"] >= 1


def test_native_coreml_compiles_once(config, tmp_path, monkeypatch):
    from anemll_fast.engine import Engine

    cls = _native_coreml()
    monkeypatch.setenv("ANEMLL_FAST_COREML_CACHE", str(tmp_path / "cache"))
    b1 = cls(compute_units="cpu_only")
    with Engine(config, b1):
        pass
    s1 = b1.stats()
    assert s1["compiles"] > 0
    b2 = cls(compute_units="cpu_only")
    with Engine(config, b2):
        pass
    s2 = b2.stats()
    assert s2["compiles"] == 0 and s2["cache_hits"] == s1["compiles"] + s1["cache_hits"]


def test_native_coreml_bad_options():
    cls = _native_coreml()
    with pytest.raises(ValueError, match="compute_units"):
        cls(compute_units="gpu_only")
    with pytest.raises(ValueError, match="output_backing"):
        cls(output_backing="surface")


@pytest.mark.parametrize("units,backing,pixels", [("cpu_and_ne", "pixel_buffer", True), ("cpu_and_ne", "auto", True),
                                                  ("cpu_only", "auto", False), ("cpu_and_ne", "multiarray", False)])
def test_native_coreml_hidden_states_and_logits_live_in_pixel_buffers(config, units, backing, pixels):
    """On the pixel path the engine binds the backend's IOSurface buffers: two decode hidden-state buffers and
    one per logits part (each part writes the array the next reads; the sampler reads logits in place)."""
    from anemll_fast.engine import Engine

    cls = _native_coreml()
    backend = cls(compute_units=units, output_backing=backing)
    with Engine(config, backend) as eng:
        prefill = 2 if eng.prefill_mode == "batch" else 0
        expected = 2 + prefill + len(config.logits_outputs) if pixels else 0
        assert eng._eng.backend_buffers == expected
    ref, cm = _generate_both(config, cls(compute_units=units, output_backing=backing), list(range(3, 12)), 5)
    _agree(ref, cm)
