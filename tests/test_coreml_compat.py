"""The coremltools drop-in (anemll_fast.coreml_compat): coremltools' call patterns on models the tests
build, compared with the reference backend used directly; errors as coremltools raises them; a
chat.py-style coremltools script run unchanged through `python -m anemll_fast.coreml_compat`."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest

import anemll_fast
from anemll_fast.backends.reference import ReferenceBackend
from anemll_fast.coreml_compat import CompiledMLModel, MLModel, MLState, patch_coremltools
from anemll_fast.coreml_compat import files
from anemll_fast.mil.loader import load_program
from anemll_fast.mil.text_writer import write_mlmodelc
from anemll_fast.testing.tiny import build_tiny_model

DRIVER = Path(__file__).resolve().parent / "coremltools_driver.py"
CONTEXT, BATCH, HIDDEN = 128, 64, 64
CHUNK1 = "llama_FFN_PF_chunk_01of02"
CHUNK2 = "llama_FFN_PF_chunk_02of02"
STATE = "model_model_kv_cache_0"

# Every test forces the reference backend (compared bit for bit with the reference backend used
# directly), except the macOS ones at the end, which run the drop-in on Core ML.
HAVE_COREML = sys.platform == "darwin" and files._native_coreml_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two chunks, batch 64, four logits parts, as .mlpackage; `compiled` holds the same as .mlmodelc."""
    m = build_tiny_model(tmp_path_factory.mktemp("compat") / "m", num_chunks=2, context_length=CONTEXT,
                         batch_size=BATCH, hidden_size=HIDDEN, split_lm_head=4, seed=4)
    compiled = m.path.parent / "compiled"
    shutil.copytree(m.path, compiled, ignore=shutil.ignore_patterns("*.mlpackage"))
    for pkg in m.path.glob("*.mlpackage"):
        write_mlmodelc(load_program(str(pkg)), str(compiled / (pkg.stem + ".mlmodelc")))
    return m.path, compiled


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another model: a shorter context (so another KV state spec) and an in-model argmax head."""
    return build_tiny_model(tmp_path_factory.mktemp("compat_other") / "o", num_chunks=2, context_length=32,
                            batch_size=8, hidden_size=HIDDEN, split_lm_head=2, argmax_head=True).path


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv(files.BACKEND_ENV, "reference")


def pkg(d, stem):
    return str(d / f"{stem}.mlpackage")


def infer_inputs(pos, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.triu(np.full((1, 1, CONTEXT, CONTEXT), -np.inf, np.float16), 1)
    return {
        "hidden_states": rng.standard_normal((1, 1, HIDDEN)).astype(dtype),
        "position_ids": np.array([pos], np.int32),
        "causal_mask": mask[:, :, pos:pos + 1, :].astype(dtype),
        "current_pos": np.array([pos], np.int32),
    }


def prefill_inputs(pos, seed=1):
    rng = np.random.default_rng(seed)
    mask = np.triu(np.full((1, 1, CONTEXT, CONTEXT), -np.inf, np.float16), 1)
    return {
        "hidden_states": rng.standard_normal((1, BATCH, HIDDEN)).astype(np.float16),
        "position_ids": np.arange(pos, pos + BATCH, dtype=np.int32),
        "causal_mask": mask[:, :, pos:pos + BATCH, :],  # a strided view, as chat.py slices it
        "current_pos": np.array([pos], np.int32),
    }


# ------------------------------------------------------------------ outputs match the reference backend
def test_chunks_share_one_state_and_match_the_reference_backend(tiny):
    d, _ = tiny
    ours = {(c, f): MLModel(pkg(d, c), function_name=f) for c in (CHUNK1, CHUNK2) for f in ("prefill", "infer")}
    ref = {(c, f): ReferenceBackend.load(pkg(d, c), f) for c in (CHUNK1, CHUNK2) for f in ("prefill", "infer")}
    state = ours[(CHUNK1, "prefill")].make_state()
    ref_state = ref[(CHUNK1, "prefill")].make_state()
    assert isinstance(state, ct.models.model.MLState) and isinstance(state, MLState)
    h, r = prefill_inputs(0), prefill_inputs(0)
    for c in (CHUNK1, CHUNK2):
        out = ours[(c, "prefill")].predict(dict(h, hidden_states=h["hidden_states"]), state)  # positional state
        expect = ref[(c, "prefill")].predict(dict(r), ref_state)
        assert out["output_hidden_states"].dtype == np.float32
        np.testing.assert_array_equal(out["output_hidden_states"], expect["output_hidden_states"].astype(np.float32))
    for pos in (BATCH, BATCH + 1):
        x = infer_inputs(pos, seed=pos)
        for c in (CHUNK1, CHUNK2):
            out = ours[(c, "infer")].predict(x, state=state)["output_hidden_states"]
            expect = ref[(c, "infer")].predict(infer_inputs(pos, seed=pos), ref_state)["output_hidden_states"]
            np.testing.assert_array_equal(out, expect.astype(np.float32))
    got = state.read_state(STATE)
    assert got.dtype == np.float32  # fp16 states come back widened, as coremltools returns them
    np.testing.assert_array_equal(got, ref_state.read(STATE).astype(np.float32))
    assert np.count_nonzero(got[:, :, BATCH + 1]) and not np.count_nonzero(got[:, :, BATCH + 2:])


def test_fp16_and_fp32_inputs_and_strided_slices_give_the_same_outputs(tiny):
    d, _ = tiny
    m = MLModel(pkg(d, CHUNK1), function_name="infer")
    x16 = infer_inputs(5)
    o16 = m.predict(x16, m.make_state())["output_hidden_states"]
    # float32 values off the fp16 grid (by less than half a step) are rounded to the declared fp16
    h32 = x16["hidden_states"].astype(np.float32) * np.float32(1 + 2 ** -13)
    assert not np.array_equal(h32, x16["hidden_states"].astype(np.float32))
    np.testing.assert_array_equal(h32.astype(np.float16), x16["hidden_states"])
    x32 = dict(x16, hidden_states=h32, causal_mask=x16["causal_mask"].astype(np.float32))
    np.testing.assert_array_equal(m.predict(x32, m.make_state())["output_hidden_states"], o16)
    x64 = dict(x16, hidden_states=x16["hidden_states"].astype(np.float64))
    np.testing.assert_array_equal(m.predict(x64, m.make_state())["output_hidden_states"], o16)
    mask = np.triu(np.full((1, 1, CONTEXT, CONTEXT), -np.inf, np.float16), 1)
    strided = mask[:, :, 5:6, :]
    assert strided.base is not None
    np.testing.assert_array_equal(m.predict(dict(x16, causal_mask=strided), m.make_state())["output_hidden_states"],
                                  o16)
    other = m.predict(dict(x16, hidden_states=x16["hidden_states"] + np.float16(1)), m.make_state())
    assert not np.array_equal(other["output_hidden_states"], o16)  # the comparison can fail


def test_embeddings_enumerated_shapes_and_logits_parts(tiny):
    d, _ = tiny
    embed = MLModel(pkg(d, "llama_embeddings"))
    ids = np.arange(BATCH, dtype=np.int32)[None]
    out = embed.predict({"input_ids": ids})["hidden_states"]
    one = embed.predict({"input_ids": ids[:, :1]})["hidden_states"]
    ref = ReferenceBackend.load(pkg(d, "llama_embeddings"))
    assert out.shape == (1, BATCH, HIDDEN) and out.dtype == np.float32
    np.testing.assert_array_equal(out, ref.predict({"input_ids": ids})["hidden_states"].astype(np.float32))
    np.testing.assert_array_equal(one[0, 0], out[0, 0])
    head = MLModel(pkg(d, "llama_lm_head"), compute_units=ct.ComputeUnit.CPU_ONLY)
    logits = head.predict({"hidden_states": out[:, :1].astype(np.float16)})
    assert list(logits) == ["logits1", "logits2", "logits3", "logits4"]
    assert all(v.dtype == np.float32 and v.shape == (1, 1, 128) for v in logits.values())


def test_batch_predict_with_a_list_of_dicts(tiny):
    d, _ = tiny
    embed = MLModel(pkg(d, "llama_embeddings"))
    outs = embed.predict([{"input_ids": np.array([[1]], np.int32)}, {"input_ids": np.array([[2]], np.int32)}])
    assert len(outs) == 2 and not np.array_equal(outs[0]["hidden_states"], outs[1]["hidden_states"])
    with pytest.raises(AssertionError, match="unbatched"):
        MLModel(pkg(d, CHUNK1), function_name="infer").predict([infer_inputs(0)], MLModel(pkg(d, CHUNK1)).make_state())


# ------------------------------------------------------------------ construction
def test_one_file_opened_for_several_functions_is_loaded_once(tiny, monkeypatch):
    d, _ = tiny
    calls = []
    real = files.LoadedFile.__init__

    def counting(self, *a, **k):
        calls.append(a[0])
        real(self, *a, **k)

    monkeypatch.setattr(files.LoadedFile, "__init__", counting)
    path = str(d / "llama_FFN_PF_chunk_02of02.mlpackage")
    models = [MLModel(path), MLModel(path, function_name="infer"), MLModel(path, function_name="prefill"),
              CompiledMLModel(path, ct.ComputeUnit.CPU_AND_NE, function_name="prefill")]
    assert len(calls) == 1
    assert len({id(m._loaded) for m in models}) == 1
    # the functions share the decoded weights (one constant cache) and each compiles its plan once
    assert models[1]._runner.model._cache is models[2]._runner.model._cache
    assert models[1]._runner is models[0]._runner  # the default function is infer
    assert models[2]._runner is models[3]._runner


def test_a_rewritten_file_is_loaded_afresh(tiny, tmp_path):
    d, _ = tiny
    copy = tmp_path / "e.mlpackage"
    shutil.copytree(pkg(d, "llama_embeddings"), copy)
    first = MLModel(str(copy))
    weights = next(copy.rglob("weight.bin"))
    data = weights.read_bytes()
    weights.write_bytes(data)  # same bytes, a new mtime: the identity changes
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
    second = MLModel(str(copy))
    assert second._loaded is not first._loaded


def test_constructor_arguments_as_coremltools_takes_them(tiny):
    d, c = tiny
    p = pkg(d, CHUNK1)
    MLModel(p, False, None, False, ct.ComputeUnit.CPU_AND_NE, None, "infer")  # all positional
    m = MLModel(model=p, compute_units=ct.ComputeUnit.ALL, function_name="prefill")
    assert m.function_name == "prefill" and m.compute_unit is ct.ComputeUnit.ALL
    assert MLModel(p).function_name == "infer"  # the default function of the description
    assert MLModel(pkg(d, "llama_lm_head")).function_name is None
    assert MLModel(pkg(d, "llama_lm_head"), function_name="main").function_name == "main"
    compiled = str(c / f"{CHUNK1}.mlmodelc")
    cm = CompiledMLModel(compiled, ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    assert cm.function_name == "infer" and cm.compute_unit is ct.ComputeUnit.CPU_AND_NE
    assert CompiledMLModel(str(c / "llama_lm_head.mlmodelc")).function_name == ""
    assert isinstance(cm, ct.models.CompiledMLModel) and isinstance(m, ct.models.MLModel)
    with pytest.raises(TypeError, match="compute_units"):
        MLModel(p, compute_units="CPU_AND_NE")
    with pytest.raises(TypeError, match="compute_units"):
        CompiledMLModel(compiled, "ALL")
    with pytest.raises(TypeError, match="path"):
        CompiledMLModel(Path(compiled))
    with pytest.raises(TypeError, match="function_name"):
        CompiledMLModel(compiled, ct.ComputeUnit.ALL, function_name=3)
    with pytest.raises(TypeError, match="Expected model"):
        MLModel(42)


def test_metadata_descriptions_and_spec(tiny):
    d, c = tiny
    p = pkg(d, CHUNK1)
    m, other = MLModel(p, function_name="infer"), MLModel(p, function_name="prefill")
    assert m.user_defined_metadata["com.anemll.chunk_no"] == "1"
    spec = m.get_spec()
    truth = ct.utils.load_spec(p)
    assert spec == truth and spec is not m.get_spec()  # the real protobuf, a fresh copy each time
    assert spec.WhichOneof("Type") == "mlProgram" and len(spec.mlProgram.functions) == 2
    m.short_description = "edited"
    m.my_attribute = 7  # callers may hang their own attributes on the model
    assert m.get_spec().description.metadata.shortDescription == "edited" and m.my_attribute == 7
    assert other.short_description != "edited"  # one model's edit stays its own
    head = MLModel(pkg(d, "llama_lm_head"))
    assert list(head.input_description) == ["hidden_states"] and "logits3" in head.output_description
    assert len(m.input_description) == 0  # multifunction: as coremltools, inputs live in the functions
    # an .mlmodelc opened with MLModel: a description-only spec built from model.mil and metadata.json
    mc = MLModel(str(c / f"{CHUNK1}.mlmodelc"), function_name="prefill")
    assert dict(mc.user_defined_metadata) == dict(m.user_defined_metadata)
    assert sorted(f.name for f in mc.get_spec().description.functions) == ["infer", "prefill"]
    hc = MLModel(str(c / "llama_lm_head.mlmodelc"))
    assert list(hc.output_description) == list(head.output_description)
    # CompiledMLModel has neither, as in coremltools (chat.py probes with hasattr)
    cm = CompiledMLModel(str(c / f"{CHUNK1}.mlmodelc"), ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    assert not hasattr(cm, "get_spec") and not hasattr(cm, "user_defined_metadata")


def test_mlmodelc_and_mlpackage_give_the_same_outputs(tiny):
    d, c = tiny
    a = MLModel(pkg(d, CHUNK1), function_name="infer")
    b = CompiledMLModel(str(c / f"{CHUNK1}.mlmodelc"), ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    x = infer_inputs(0)
    np.testing.assert_array_equal(a.predict(x, a.make_state())["output_hidden_states"],
                                  b.predict(x, b.make_state())["output_hidden_states"])


# ------------------------------------------------------------------ states
def test_state_read_write_and_sharing_rules(tiny, other):
    d, _ = tiny
    infer = MLModel(pkg(d, CHUNK1), function_name="infer")
    state = infer.make_state()
    shape = state.read_state(STATE).shape
    assert not state.read_state(STATE).any()  # a new state starts at zero
    value = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    state.write_state(name=STATE, value=value)
    np.testing.assert_array_equal(state.read_state(name=STATE), value.astype(np.float16).astype(np.float32))
    state.write_state(STATE, value.astype(np.float16))
    # a written state is what the next prediction reads
    ref = ReferenceBackend.load(pkg(d, CHUNK1), "infer")
    ref_state = ref.make_state()
    ref_state.write(STATE, value.astype(np.float16))
    np.testing.assert_array_equal(infer.predict(infer_inputs(3), state)["output_hidden_states"],
                                  ref.predict(infer_inputs(3), ref_state)["output_hidden_states"].astype(np.float32))
    with pytest.raises(RuntimeError, match="nope"):
        state.read_state("nope")
    with pytest.raises(RuntimeError, match="shape"):
        state.write_state(STATE, np.zeros((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="multi-array"):
        state.write_state(STATE, "text")
    with pytest.raises(RuntimeError, match="nope"):
        state.write_state("nope", value)
    # a state whose spec differs (another context length) is refused, naming both specs
    foreign = MLModel(str(other / f"{CHUNK1}.mlpackage"), function_name="infer").make_state()
    with pytest.raises(RuntimeError, match=STATE):
        infer.predict(infer_inputs(3), foreign)
    with pytest.raises(RuntimeError, match="state"):
        infer.predict(infer_inputs(3))  # a stateful function without a state
    with pytest.raises(TypeError, match="make_state"):
        infer.predict(infer_inputs(3), state={"kv": 1})


# ------------------------------------------------------------------ errors as coremltools raises them
def test_missing_files_and_wrong_functions(tiny, tmp_path):
    d, c = tiny
    with pytest.raises(FileNotFoundError, match="nothere.mlpackage"):
        MLModel(str(tmp_path / "nothere.mlpackage"))
    with pytest.raises(RuntimeError, match="nothere.mlmodelc"):
        CompiledMLModel(str(tmp_path / "nothere.mlmodelc"))
    (tmp_path / "empty.mlmodelc").mkdir()
    with pytest.raises(RuntimeError, match="valid manifest does not exist"):
        CompiledMLModel(str(tmp_path / "empty.mlmodelc"))
    with pytest.raises(ValueError, match="function_name infer_rotate not found"):
        MLModel(pkg(d, CHUNK1), function_name="infer_rotate")
    with pytest.raises(ValueError, match='must be "main"'):
        MLModel(pkg(d, "llama_lm_head"), function_name="infer")
    with pytest.raises(RuntimeError, match="functionName 'infer_rotate'"):
        CompiledMLModel(str(c / f"{CHUNK1}.mlmodelc"), ct.ComputeUnit.CPU_AND_NE, function_name="infer_rotate")
    with pytest.raises(RuntimeError, match="functionName 'infer'"):
        CompiledMLModel(str(c / "llama_lm_head.mlmodelc"), function_name="infer")


def test_wrong_input_names_dtypes_and_shapes(tiny):
    d, c = tiny
    m = MLModel(pkg(d, CHUNK1), function_name="infer")
    s = m.make_state()
    with pytest.raises(KeyError, match="update_mask"):  # what chat.py-style callers probe for
        m.predict(dict(infer_inputs(0), update_mask=np.zeros((1, 1, CONTEXT, 1), np.float16)), s)
    cm = CompiledMLModel(str(c / f"{CHUNK1}.mlmodelc"), ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    extra = cm.predict(dict(infer_inputs(0), update_mask=np.zeros((1, 1, CONTEXT, 1), np.float16)), cm.make_state())
    np.testing.assert_array_equal(extra["output_hidden_states"],
                                  cm.predict(infer_inputs(0), cm.make_state())["output_hidden_states"])
    x = infer_inputs(0)
    del x["current_pos"]
    with pytest.raises(RuntimeError, match="current_pos is required"):
        m.predict(x, s)
    bad = {
        "position_ids": (np.array([0], np.int64), "int64"),  # coremltools cannot convert int64 arrays
        "current_pos": (np.array([0.0], np.float32), "int32"),
        "hidden_states": (np.zeros((1, 1, HIDDEN), np.int32), "fp16"),
        "causal_mask": (np.zeros((1, 1, 1, CONTEXT), np.bool_), "bool"),
    }
    for name, (value, fragment) in bad.items():
        with pytest.raises(RuntimeError, match=f"'{name}'.*{fragment}"):
            m.predict(dict(infer_inputs(0), **{name: value}), s)
    with pytest.raises(RuntimeError, match=r"'hidden_states' has shape \[1, 2, 64\].*\[1, 1, 64\]"):
        m.predict(dict(infer_inputs(0), hidden_states=np.zeros((1, 2, HIDDEN), np.float16)), s)
    embed = MLModel(pkg(d, "llama_embeddings"))
    with pytest.raises(RuntimeError, match=r"'input_ids' has shape \[1, 3\].*one of"):
        embed.predict({"input_ids": np.zeros((1, 3), np.int32)})
    with pytest.raises(RuntimeError, match="'input_ids'.*str"):
        embed.predict({"input_ids": "1 2"})
    with pytest.raises(TypeError, match='"data"'):
        embed.predict(("input_ids", 1))
    assert not s.read_state(STATE).any()  # the refused calls left the state alone


# ------------------------------------------------------------------ patching and backend choice
def test_patch_coremltools_and_undo(tiny):
    d, _ = tiny
    originals = ct.models.MLModel, ct.models.model.MLModel, ct.models.CompiledMLModel
    undo = patch_coremltools()
    try:
        assert ct.models.MLModel is MLModel and ct.models.model.MLModel is MLModel
        assert ct.models.CompiledMLModel is CompiledMLModel
        from coremltools.models import MLModel as looked_up

        assert looked_up is MLModel
        assert isinstance(ct.models.MLModel(pkg(d, "llama_lm_head")), MLModel)
    finally:
        undo()
    assert (ct.models.MLModel, ct.models.model.MLModel, ct.models.CompiledMLModel) == originals
    undo()  # twice is harmless
    with anemll_fast.patch_coremltools() as handle:
        assert handle.active and ct.models.CompiledMLModel is CompiledMLModel
    assert ct.models.CompiledMLModel is originals[2] and not handle.active


def test_backend_choice(tiny, monkeypatch):
    d, _ = tiny
    monkeypatch.setenv(files.BACKEND_ENV, "metal")
    with pytest.raises(ValueError, match="ANEMLL_FAST_BACKEND='metal'"):
        MLModel(pkg(d, "llama_lm_head"))
    monkeypatch.delenv(files.BACKEND_ENV)
    expected = "coreml" if sys.platform == "darwin" and files._native_coreml_available() else "reference"
    assert files.backend_name() == expected
    if sys.platform != "darwin":
        monkeypatch.setenv(files.BACKEND_ENV, "coreml")
        with pytest.raises(RuntimeError, match="no Core ML backend"):
            MLModel(pkg(d, "llama_lm_head"))


# ------------------------------------------------------------------ the script, unchanged
def _run(args, env_backend="reference", timeout=300):
    # the anemll_fast these tests import (a checkout built in place, or an installed wheel)
    env = dict(os.environ, PYTHONPATH=str(Path(anemll_fast.__file__).resolve().parents[1]), OPENBLAS_NUM_THREADS="1")
    if env_backend:
        env[files.BACKEND_ENV] = env_backend
    # cwd outside the checkout: `python -m` puts cwd first on sys.path
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), env=env)


def _prompt(n=70):
    return [(i * 37 + 11) % 500 + 3 for i in range(n)]


def _anemll_fast_tokens(model_dir, prompt, n):
    with anemll_fast.load(str(model_dir), backend="reference") as model:
        return [r.token for r in anemll_fast.stream_generate(model, prompt, max_tokens=n, temperature=0.0)
                if r.token is not None]


@pytest.mark.slow
def test_coremltools_script_runs_unchanged_and_matches_anemll_fast(tiny):
    d, c = tiny
    prompt, n = _prompt(), 10  # one full batch of 64, six prompt tokens through infer
    expected = _anemll_fast_tokens(d, prompt, n)
    assert len(expected) == n and len(set(expected)) > 2  # a negative control: not one repeated token
    ids = ",".join(map(str, prompt))
    for model_dir, extra in ((d, []), (c, ["--fp32-inputs"])):  # MLModel + fp16, CompiledMLModel + fp32
        r = _run(["-m", "anemll_fast.coreml_compat", str(DRIVER), str(model_dir), "--prompt-ids", ids,
                  "--max-tokens", str(n), *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == expected, model_dir
    # the same script on plain coremltools refuses off macOS (it cannot make a state or predict)
    if sys.platform != "darwin":
        plain = _run([str(DRIVER), str(d), "--prompt-ids", ids, "--max-tokens", "2"], env_backend=None)
        assert plain.returncode != 0
        assert "State functionality is only supported on macOS 15+" in plain.stderr


def test_module_entry_point_arguments(tmp_path, monkeypatch, capsys):
    from anemll_fast.coreml_compat import __main__ as entry

    script = tmp_path / "show_module.py"
    script.write_text("import sys, coremltools as ct\n"
                      "print(ct.models.MLModel.__module__, ct.models.CompiledMLModel.__module__, sys.argv[1:])\n")
    # in-process: the checks made before anything runs
    with pytest.raises(SystemExit) as e:
        entry.main([])
    assert e.value.code == 2 and "usage" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such script"):
        entry.main([str(tmp_path / "missing.py")])
    with pytest.raises(SystemExit, match="usage"):
        entry.main(["-m"])
    monkeypatch.setenv(files.BACKEND_ENV, "gpu")
    with pytest.raises(SystemExit, match="ANEMLL_FAST_BACKEND='gpu'"):
        entry.main([str(script)])
    monkeypatch.setenv(files.BACKEND_ENV, "reference")
    # a module with -m, in-process (monkeypatch puts coremltools' classes and sys.argv back afterwards)
    for module, attr in (("models", "MLModel"), ("models", "CompiledMLModel")):
        monkeypatch.setattr(getattr(ct, module), attr, getattr(getattr(ct, module), attr))
    monkeypatch.setattr(ct.models.model, "MLModel", ct.models.model.MLModel)
    monkeypatch.setattr(ct.models._compiled_model, "CompiledMLModel", ct.models._compiled_model.CompiledMLModel)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.syspath_prepend(str(tmp_path))
    entry.main(["-m", "show_module", "x"])
    assert capsys.readouterr().out.split() == ["anemll_fast.coreml_compat.models"] * 2 + ["['x']"]
    monkeypatch.undo()
    assert ct.models.MLModel.__module__ == "coremltools.models.model"  # restored
    assert ct.models.CompiledMLModel.__module__ == "coremltools.models._compiled_model"
    # the script itself, as its own process: its arguments, and the classes it finds
    r = _run(["-m", "anemll_fast.coreml_compat", str(script), "a", "--b"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["anemll_fast.coreml_compat.models"] * 2 + ["['a',", "'--b']"]


# ------------------------------------------------------------------ the native path, off macOS
@pytest.fixture
def native(monkeypatch):
    """The drop-in's native path (NativeFunction over _native.NativeModel, as on macOS), with the
    callback backend over the reference backend standing in for Core ML."""
    from anemll_fast import _native

    backends = {}

    def callback_backend(units):
        return backends.setdefault(units, _native.CallbackBackend(ReferenceBackend))

    monkeypatch.setattr(files, "_native_coreml_available", lambda: True)
    monkeypatch.setattr(files, "native_backend", callback_backend)
    monkeypatch.setenv(files.BACKEND_ENV, "coreml")
    return backends


def test_native_path_matches_the_reference_backend(tiny, native):
    from anemll_fast.coreml_compat.native import NativeFunction

    d, c = tiny
    prefill = MLModel(pkg(d, CHUNK1), function_name="prefill")
    infer = CompiledMLModel(str(c / f"{CHUNK1}.mlmodelc"), ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    infer2 = MLModel(pkg(d, CHUNK2), compute_units=ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    assert isinstance(prefill._runner, NativeFunction) and list(native) == ["all", "cpu_and_ne"]
    ref1, ref2 = ReferenceBackend.load(pkg(d, CHUNK1), "prefill"), ReferenceBackend.load(pkg(d, CHUNK2), "infer")
    ref_state = ref1.make_state()
    pstate = prefill.make_state()
    out = prefill.predict(prefill_inputs(0), pstate)["output_hidden_states"]
    np.testing.assert_array_equal(out, ref1.predict(prefill_inputs(0), ref_state)["output_hidden_states"]
                                  .astype(np.float32))
    np.testing.assert_array_equal(pstate.read_state(STATE), ref_state.read(STATE).astype(np.float32))
    with pytest.raises(RuntimeError, match="another backend"):  # states live in one compute-units setting
        infer.predict(infer_inputs(BATCH), pstate)
    # one state across files; fp32 inputs are rounded to the declared fp16 on their way into the buffers
    state = infer.make_state()
    value = pstate.read_state(STATE)
    state.write_state(STATE, value)
    np.testing.assert_array_equal(state.read_state(STATE), value)
    ref_state2 = ref2.make_state()
    ref_state2.write(STATE, value.astype(np.float16))
    x = infer_inputs(BATCH)
    x32 = dict(x, hidden_states=x["hidden_states"].astype(np.float32) * np.float32(1 + 2 ** -13))
    got = infer2.predict(x32, state)["output_hidden_states"]
    np.testing.assert_array_equal(got, ref2.predict(x, ref_state2)["output_hidden_states"].astype(np.float32))
    with pytest.raises(RuntimeError, match="shape"):
        state.write_state(STATE, np.zeros((2, 2), np.float32))


def test_native_path_binds_once_per_input_shape(tiny, native):
    d, _ = tiny
    embed = MLModel(pkg(d, "llama_embeddings"), compute_units=ct.ComputeUnit.CPU_AND_NE)
    ref = ReferenceBackend.load(pkg(d, "llama_embeddings"))
    for n in (1, BATCH, 1, BATCH):
        ids = (np.arange(n, dtype=np.int32) * 7 % 500)[None]
        out = embed.predict({"input_ids": ids})["hidden_states"]
        assert out.shape == (1, n, HIDDEN) and out.dtype == np.float32
        np.testing.assert_array_equal(out, ref.predict({"input_ids": ids})["hidden_states"].astype(np.float32))
    assert len(embed._runner._bindings) == 2
    for _, ins, outs in embed._runner._bindings.values():  # page-aligned, so Core ML need not copy them
        assert all(b.ctypes.data % 16384 == 0 and b.flags.c_contiguous for b in [*ins.values(), *outs.values()])
    first = embed.predict({"input_ids": np.array([[1]], np.int32)})["hidden_states"]
    embed.predict({"input_ids": np.array([[2]], np.int32)})
    assert not np.array_equal(first, embed.predict({"input_ids": np.array([[2]], np.int32)})["hidden_states"])
    # a returned array is the caller's own: the next prediction does not overwrite it
    np.testing.assert_array_equal(first, embed.predict({"input_ids": np.array([[1]], np.int32)})["hidden_states"])
    from anemll_fast.coreml_compat import native as native_mod

    native_mod.MAX_BINDINGS, saved = 1, native_mod.MAX_BINDINGS
    try:  # past the cap, the least recently used shape's buffers are dropped
        embed._runner._bindings.clear()
        embed.predict({"input_ids": np.zeros((1, 1), np.int32)})
        embed.predict({"input_ids": np.zeros((1, BATCH), np.int32)})
        assert [k[0] for k in embed._runner._bindings] == [(1, BATCH)]
    finally:
        native_mod.MAX_BINDINGS = saved
    head = MLModel(pkg(d, "llama_lm_head"), compute_units=ct.ComputeUnit.CPU_AND_NE)
    logits = head.predict({"hidden_states": first.astype(np.float16)})
    assert list(logits) == ["logits1", "logits2", "logits3", "logits4"]


def test_native_model_wrapper_errors(tiny):
    from anemll_fast import _native

    d, _ = tiny
    be = _native.CallbackBackend(ReferenceBackend)
    with pytest.raises(RuntimeError, match="nothere"):
        _native.NativeModel(be, str(d / "nothere.mlpackage"), "infer")
    model = _native.NativeModel(be, pkg(d, CHUNK1), "infer")
    with pytest.raises(ValueError, match="C-contiguous"):
        model.bind({"hidden_states": np.zeros((1, 1, 2 * HIDDEN), np.float16)[:, :, ::2]}, {})
    with pytest.raises(ValueError, match="no backend type"):
        model.bind({"hidden_states": np.zeros((1, 1, HIDDEN), np.complex64)}, {})
    state = model.make_state()
    with pytest.raises(RuntimeError):  # the backend's own error, with its cause kept
        state.read("nope", np.zeros((1,), np.float16))
    with pytest.raises(NotImplementedError, match="null"):
        _native.NativeModel(_native.NullBackend(), pkg(d, CHUNK1), "infer").make_state().read(
            STATE, np.zeros((1,), np.float16))


def test_skip_model_load_reads_the_description_only(tiny, monkeypatch):
    d, _ = tiny
    path = str(d / "llama_FFN_PF_chunk_02of02.mlpackage")
    m = MLModel(path, function_name="prefill", skip_model_load=True)
    assert m._loaded._program is None  # nothing decoded
    assert m.user_defined_metadata["com.anemll.chunk_no"] == "2"
    with pytest.raises(Exception, match="skip_model_load"):
        m.predict(prefill_inputs(0))


def test_loaded_files_go_with_their_last_model(tiny, tmp_path):
    import gc

    d, _ = tiny
    copy = tmp_path / "head.mlpackage"
    shutil.copytree(pkg(d, "llama_lm_head"), copy)
    a, b = MLModel(str(copy)), MLModel(str(copy))
    assert str(copy.resolve()) in files.cached_files()
    del a
    gc.collect()
    assert str(copy.resolve()) in files.cached_files()
    del b
    gc.collect()
    assert str(copy.resolve()) not in files.cached_files()


def test_argmax_head_outputs_keep_int32(other):
    head = MLModel(str(other / "llama_lm_head.mlpackage"))
    x = np.random.default_rng(0).standard_normal((1, 1, HIDDEN)).astype(np.float16)
    out = head.predict({"hidden_states": x})
    ref = ReferenceBackend.load(str(other / "llama_lm_head.mlpackage")).predict({"hidden_states": x})
    assert {k: v.dtype for k, v in out.items()} == {"argmax_idx": np.int32, "argmax_val": np.float32}
    np.testing.assert_array_equal(out["argmax_idx"], ref["argmax_idx"])


def test_a_model_the_backend_cannot_run_fails_at_construction(tiny, monkeypatch, tmp_path):
    from anemll_fast.mil import plan
    from anemll_fast.mil.errors import UnsupportedOpError

    d, _ = tiny
    copy = tmp_path / "e.mlpackage"
    shutil.copytree(pkg(d, "llama_embeddings"), copy)

    def refuse(program):
        raise UnsupportedOpError(f"{program.source}: op 'fancy_op' is not supported")

    monkeypatch.setattr(plan, "check_supported", refuse)
    with pytest.raises(RuntimeError, match="fancy_op"):
        MLModel(str(copy))


# ------------------------------------------------------------------ macOS: the drop-in on Core ML
@pytest.fixture
def coreml(monkeypatch, tmp_path_factory):
    if not HAVE_COREML:
        pytest.skip("Core ML runs only on macOS, in a build with the Core ML backend")
    monkeypatch.setenv(files.BACKEND_ENV, "coreml")
    monkeypatch.setenv("ANEMLL_FAST_COREML_CACHE", str(tmp_path_factory.getbasetemp() / "coreml_cache"))


def _close(got, want):
    want = np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05 * scale, rtol=0)


def test_core_ml_drop_in_agrees_with_the_reference_backend(tiny, coreml):
    from anemll_fast.coreml_compat.native import NativeFunction

    d, c = tiny
    embed = MLModel(pkg(d, "llama_embeddings"), compute_units=ct.ComputeUnit.CPU_ONLY)
    assert isinstance(embed._runner, NativeFunction)
    ref_embed = ReferenceBackend.load(pkg(d, "llama_embeddings"))
    for n in (1, BATCH):
        ids = (np.arange(n, dtype=np.int32) * 7 % 500)[None]
        _close(embed.predict({"input_ids": ids})["hidden_states"], ref_embed.predict({"input_ids": ids})["hidden_states"])
    infer = MLModel(pkg(d, CHUNK1), compute_units=ct.ComputeUnit.CPU_ONLY, function_name="infer")
    infer2 = CompiledMLModel(pkg(d, CHUNK2), ct.ComputeUnit.CPU_ONLY, function_name="infer")
    ref1, ref2 = ReferenceBackend.load(pkg(d, CHUNK1), "infer"), ReferenceBackend.load(pkg(d, CHUNK2), "infer")
    state, ref_state = infer.make_state(), ref1.make_state()
    assert not state.read_state(STATE).any()
    for pos in range(3):
        x = infer_inputs(pos, seed=pos)
        h = infer.predict(x, state)["output_hidden_states"]
        r = ref1.predict(infer_inputs(pos, seed=pos), ref_state)["output_hidden_states"]
        _close(h, r)
        x2 = dict(infer_inputs(pos, seed=pos), hidden_states=h.astype(np.float16))
        _close(infer2.predict(x2, state=state)["output_hidden_states"],
               ref2.predict(dict(x2, hidden_states=r), ref_state)["output_hidden_states"])
    got = state.read_state(STATE)
    assert got.dtype == np.float32
    _close(got, ref_state.read(STATE))
    state.write_state(STATE, np.zeros_like(got))
    assert not state.read_state(STATE).any()
    with pytest.raises(RuntimeError, match="nope"):
        state.read_state("nope")


@pytest.mark.slow
def test_core_ml_drop_in_runs_the_script_as_coremltools_does(tiny, coreml):
    d, _ = tiny
    ids = ",".join(map(str, _prompt()))
    args = [str(DRIVER), str(d), "--prompt-ids", ids, "--max-tokens", "6"]
    plain = _run(args, env_backend=None)
    ours = _run(["-m", "anemll_fast.coreml_compat", *args], env_backend="coreml")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert json.loads(ours.stdout.strip().splitlines()[-1]) == json.loads(plain.stdout.strip().splitlines()[-1])


def test_models_other_than_ml_programs_go_to_coremltools(tmp_path, tiny):
    from coremltools.models import datatypes
    from coremltools.models.model import MLModel as CoremltoolsMLModel
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", datatypes.Array(2))], [("y", datatypes.Array(2))])
    builder.add_activation("relu", "RELU", "x", "y")
    path = tmp_path / "nn.mlmodel"
    ct.utils.save_spec(builder.spec, str(path))
    for model in (str(path), builder.spec):
        m = MLModel(model)
        assert type(m) is CoremltoolsMLModel and m.get_spec().WhichOneof("Type") == "neuralNetwork"
    # an ML program spec with its weights becomes a temporary package run by anemll_fast
    d, _ = tiny
    spec = ct.utils.load_spec(pkg(d, "llama_lm_head"))
    weights = next(Path(pkg(d, "llama_lm_head")).rglob("weights"))
    m = MLModel(spec, weights_dir=str(weights))
    assert isinstance(m, MLModel) and m.is_temp_package
    x = np.ones((1, 1, HIDDEN), np.float16)
    np.testing.assert_array_equal(m.predict({"hidden_states": x})["logits1"],
                                  MLModel(pkg(d, "llama_lm_head")).predict({"hidden_states": x})["logits1"])
    with pytest.raises(Exception, match="weights_dir"):
        MLModel(spec)
