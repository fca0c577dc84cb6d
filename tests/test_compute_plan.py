"""The compute plan report (anemll_fast.compute_plan) and the load-time placement warning, driven by fake
MLComputePlan reports; off macOS, the clear error naming the requirement (API, CLI, native call)."""
import subprocess
import sys
import warnings

import pytest

import anemll_fast
from anemll_fast import compute_plan as cp
from anemll_fast import model as model_mod
from anemll_fast.testing.tiny import build_tiny_model

IS_MACOS = sys.platform == "darwin"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("plan") / "m", arch="llama", context_length=32, batch_size=8,
                            num_chunks=2, tied=False, split_lm_head=2, seed=2)


def _entry(ne, gpu, cpu, ops=(10, 0, 2, 5)):
    return {"ops": dict(zip(("neural_engine", "gpu", "cpu", "unassigned"), ops)),
            "cost": {"neural_engine": ne, "gpu": gpu, "cpu": cpu, "unassigned": 0.0}}


def fake_plan(off_ne=()):
    """A plan_fn: every function mostly on the Neural Engine, except files whose name contains a string in
    off_ne (mostly CPU). Records its calls."""
    calls = []

    def plan_fn(path, function, units):
        calls.append((path, function, units))
        e = _entry(0.1, 0.0, 0.9) if any(s in path for s in off_ne) else _entry(0.95, 0.0, 0.05)
        if "FFN" in path or "chunk" in path:
            return {"functions": {"infer": e, "prefill": e}}
        return {"functions": {"main": e}}

    plan_fn.calls = calls
    return plan_fn


def test_plan_covers_every_part_and_function_once_per_file(tiny):
    config = anemll_fast.ModelConfig.from_anemll_dir(tiny.path)
    fn = fake_plan()
    plan = cp.compute_plan(config, "cpu_and_ne", plan_fn=fn)
    labels = [(f.part, f.function) for f in plan.functions]
    assert labels == [(label, comp.function or "main") for label, comp in config.components()]
    assert ("ffn_prefill[1]", "prefill") in labels and ("ffn_infer[0]", "infer") in labels
    files = {str(config.path_of(c)) for _, c in config.components()}
    assert sorted(p for p, _, _ in fn.calls) == sorted(files)  # one Core ML plan per file
    assert all(units == "cpu_and_ne" for _, _, units in fn.calls)
    f = plan.functions[0]
    assert f.cost_share == pytest.approx({"neural_engine": 0.95, "gpu": 0.0, "cpu": 0.05})
    assert f.ops["unassigned"] == 5
    text = plan.format()
    assert "Neural Engine 95%" in text and "unassigned 5" in text and "lm_head" in text
    d = plan.to_dict()
    assert d["compute_units"] == "cpu_and_ne" and d["functions"][0]["cost_share"]["neural_engine"] == pytest.approx(0.95)


def test_placement_warnings_name_the_part_off_the_neural_engine(tiny):
    config = anemll_fast.ModelConfig.from_anemll_dir(tiny.path)
    plan = cp.compute_plan(config, "cpu_and_ne", plan_fn=fake_plan(off_ne=("lm_head",)))
    msgs = cp.placement_warnings(plan)
    assert len(msgs) == 1
    assert msgs[0].startswith("lm_head (") and "10%" in msgs[0] and "CPU 90%" in msgs[0] and "cpu_and_ne" in msgs[0]
    assert cp.placement_warnings(cp.compute_plan(config, plan_fn=fake_plan())) == []


@pytest.mark.parametrize("ne,warned", [(0.49, True), (0.5, False), (0.0, True)])
def test_threshold_is_half_the_cost(ne, warned):
    plan = cp.ComputePlan("cpu_and_ne", [cp.FunctionPlacement("lm_head", "h.mlmodelc", "main", {},
                                                               {"neural_engine": ne, "gpu": 0.0, "cpu": 1.0 - ne})])
    assert bool(cp.placement_warnings(plan)) is warned


def test_no_cost_estimate_is_no_warning():
    plan = cp.ComputePlan("cpu_and_ne", [cp.FunctionPlacement("emb", "e.mlmodelc", "main", {"cpu": 3},
                                                               {"neural_engine": 0.0, "gpu": 0.0, "cpu": 0.0})])
    assert plan.functions[0].neural_engine_share is None and cp.placement_warnings(plan) == []
    assert "no estimate" in plan.format()


def test_missing_function_in_the_plan_names_the_part(tiny):
    config = anemll_fast.ModelConfig.from_anemll_dir(tiny.path)
    with pytest.raises(cp.ComputePlanUnavailable, match=r"ffn_prefill.*no function 'prefill'"):
        cp.compute_plan(config, plan_fn=lambda p, f, u: {"functions": {"infer": _entry(1, 0, 0), "main": _entry(1, 0, 0)}})


@pytest.fixture
def as_coreml(monkeypatch):
    """`load` as on a Mac with the Core ML backend: the backend name is coreml, the engine runs the reference
    backend, and compute plans come from `plan_fn`."""
    state = {"plan_fn": fake_plan()}
    monkeypatch.setattr(model_mod, "_pick_backend", lambda backend: "coreml")
    monkeypatch.setattr(model_mod, "_backend_object", lambda name, units: "reference")
    real = cp.compute_plan
    monkeypatch.setattr(cp, "compute_plan", lambda config, units="cpu_and_ne", **kw: real(
        config, units, plan_fn=state["plan_fn"]))
    return state


def test_load_warns_naming_the_part_under_cpu_and_ne(tiny, as_coreml):
    as_coreml["plan_fn"] = fake_plan(off_ne=("lm_head",))
    with pytest.warns(cp.PlacementWarning, match=r"^lm_head \(.*only 10% .*Neural Engine"):
        m = anemll_fast.load(tiny.path)
    with m:
        assert m.backend == "coreml" and m.compute_units == "cpu_and_ne"
        assert [f.part for f in m.compute_plan().functions][-1] == "lm_head"


@pytest.mark.parametrize("kwargs", [{"compute_units": "cpu_only"}, {"compute_units": "all"},
                                    {"check_placement": False}])
def test_load_does_not_warn_elsewhere(tiny, as_coreml, kwargs):
    as_coreml["plan_fn"] = fake_plan(off_ne=("lm_head", "FFN", "chunk", "embeddings"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cp.PlacementWarning)
        anemll_fast.load(tiny.path, **kwargs).close()


def test_load_without_a_plan_loads_quietly(tiny, as_coreml):
    def unavailable(path, function, units):
        raise cp.ComputePlanUnavailable("MLComputePlan needs macOS 14.4 or newer; this is macOS 14.2")

    as_coreml["plan_fn"] = unavailable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anemll_fast.load(tiny.path).close()


@pytest.mark.skipif(IS_MACOS, reason="off macOS only")
def test_off_macos_the_error_names_the_requirement(tiny):
    with anemll_fast.load(tiny.path, backend="reference") as m:
        with pytest.raises(cp.ComputePlanUnavailable, match=r"macOS 14\.4 or newer.*this is Linux"):
            m.compute_plan()
    from anemll_fast import _native

    with pytest.raises(RuntimeError, match="not built in"):
        _native.coreml_compute_plan(str(tiny.path / "x.mlpackage"))
    with pytest.raises(ValueError, match="compute_units"):
        _native.coreml_compute_plan("x.mlpackage", compute_units="npu")


@pytest.mark.skipif(IS_MACOS, reason="off macOS only")
def test_cli_compute_plan_error_off_macos(tiny):
    r = subprocess.run([sys.executable, "-m", "anemll_fast", "inspect", "--compute-plan", str(tiny.path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "inspect: error:" in r.stderr and "MLComputePlan" in r.stderr and "macOS 14.4" in r.stderr


def test_default_compute_units_are_cpu_and_ne_everywhere():
    """As ANEMLL (ModelLoader.swift, chat.py): the API, the CLI, both Core ML backends, the native options."""
    import inspect
    import re
    from pathlib import Path

    from anemll_fast.backends import coremltools_backend as ctb
    from anemll_fast.cli import build_parser

    assert inspect.signature(anemll_fast.load).parameters["compute_units"].default == "cpu_and_ne"
    assert inspect.signature(ctb.load).parameters["compute_units"].default == "cpu_and_ne"
    assert ctb.CoreMLToolsBackend().compute_units == "cpu_and_ne"
    parser = build_parser()
    for cmd in (["generate", "--prompt", "x"], ["inspect", "--compute-plan", "x"]):
        assert parser.parse_args(cmd).compute_units == "cpu_and_ne"
    from anemll_fast import _native

    assert "compute_units='cpu_and_ne'" in _native.coreml_compute_plan.__doc__
    # The native default (options_init in the .mm, and the header's stub elsewhere): not runnable here.
    csrc = Path(__file__).resolve().parents[1] / "csrc" / "coreml"
    for f in ("coreml_backend.mm", "coreml_backend.h"):
        inits = re.findall(r"compute_units = (ANEMLL_COREML_\w+);", (csrc / f).read_text())
        assert inits and set(inits) == {"ANEMLL_COREML_CPU_AND_NE"}, (f, inits)
