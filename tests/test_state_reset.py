"""ReferenceState.reset zeroes the state's buffers in place (no fresh allocation whose pages the next
prefill would fault in): a function updating its state in place keeps working across resets."""
from __future__ import annotations

import numpy as np
import pytest


def test_reset_zeroes_the_buffers_in_place_and_updates_still_land(tmp_path):
    """A function updating its state in place accumulates over calls; reset brings it back to zeros in the
    same buffer object."""
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
    buffers = {n: b.array for n, b in st.buffers.items()}
    st.reset()
    assert all(st.buffers[n].array is a and not a.any() for n, a in buffers.items())
    out = list(m.predict({"x": x}, st).values())[0]
    assert np.array_equal(out, x)
