"""A plan drops each value it computed once no later step reads it (mil/plan.py): a batch call's
intermediates then reuse a little heap instead of piling up until the call returns."""
from __future__ import annotations

import numpy as np
import pytest


def _plan(tmp_path, prog, fuse=False):
    ct = pytest.importorskip("coremltools")
    from anemll_fast.mil import load_program
    from anemll_fast.mil.plan import Plan

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = str(tmp_path / "m.mlpackage")
    model.save(path)
    return Plan(load_program(path), None, fuse=fuse)


def _watched(plan):
    """The plan with each step's run wrapped to note, after it, which slots hold a value."""
    held = []
    plan._runs = [lambda env, r=r: (r(env), held.append([v is not None for v in env])) for r in plan._runs]
    return held


def test_intermediates_are_dropped_after_their_last_reader_and_outputs_kept(tmp_path):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((2, 3), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        a = mb.mul(x=x, y=np.float32(2.0))
        b = mb.add(x=a, y=np.float32(1.0))
        c = mb.mul(x=a, y=b)          # a's last reader
        d = mb.sub(x=c, y=b)          # b's
        e = mb.exp(x=mb.mul(x=c, y=np.float32(0.1)))  # c's
        return d, e

    plan = _plan(tmp_path, prog)
    held = _watched(plan)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    d, e = plan.run([x], [])
    a = x * 2
    b = a + 1
    c = a * b
    assert np.array_equal(d, c - b) and np.allclose(e, np.exp(c * np.float32(0.1)))
    n_steps = len(plan.steps)
    assert len(held) == n_steps
    made = {s for s, v in enumerate(plan.template)
            if v is None and s not in plan.input_slots and any(h[s] for h in held)}
    outs = set(plan.output_slots)
    for s in made - outs:
        alive = [i for i, h in enumerate(held) if h[s]]
        assert not held[-1][s], f"slot {s} is still held after the last step"
        assert alive == list(range(alive[0], alive[-1] + 1))  # made once, then held until dropped
    assert all(held[-1][s] for s in outs)
    # every intermediate was read by a later step before being dropped: 4 of them (a, b, c, c * 0.1)
    assert len(made - outs) == 4


def test_a_state_update_in_place_still_sees_its_buffer(tmp_path):
    """Dropping values never drops the state's buffer: a function updating its state in place, run twice,
    accumulates."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from anemll_fast.backends.reference import ReferenceBackend

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16),
                             mb.StateTensorSpec((1, 4), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x, acc):
        s = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=s)
        return mb.mul(x=s, y=np.float16(1.0))

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    path = str(tmp_path / "s.mlpackage")
    model.save(path)
    m = ReferenceBackend.load(path)
    st = m.make_state()
    x = np.array([[1, 2, 3, 4]], np.float16)
    m.predict({"x": x}, st)
    out = list(m.predict({"x": x}, st).values())[0]
    assert np.array_equal(out, 2 * x)
    st.reset()
    out = list(m.predict({"x": x}, st).values())[0]
    assert np.array_equal(out, x)
