"""Bad input to the reference backend: wrong inputs, mismatched states, corrupt files, and a fuzz test."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anemll_fast.backends.reference import ReferenceBackend
from anemll_fast.mil import MilError, MilInputError, StateSpecError, WeightFileError
from anemll_fast.mil.blobfile import BlobWriter
from anemll_fast.mil.text_parser import parse_mil_text

TEXT = """program(1.3)
{
    func main<ios18>(tensor<fp16, [1, 4]> x, tensor<int32, [2]> ids, state<tensor<fp16, [%d, 4]>> cache) {
        tensor<fp16, [4, 4]> w = const()[name = string("w"), val = tensor<fp16, [4, 4]>(BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(64)))];
        tensor<fp16, [1, 4]> y = linear(x = x, weight = w)[name = string("y")];
        tensor<fp16, [%d, 4]> c = read_state(input = cache)[name = string("c")];
        tensor<fp16, [1, 4]> g = gather(x = c, indices = ids, axis = int32(0))[name = string("g")];
    } -> (y, g);
}
"""


def make(tmp_path, rows=3, name="m"):
    d = tmp_path / f"{name}.mlmodelc"
    (d / "weights").mkdir(parents=True)
    (d / "model.mil").write_text(TEXT % (rows, rows))
    bw = BlobWriter()
    bw.add(np.eye(4, dtype=np.float16), "fp16")
    (d / "weights" / "weight.bin").write_bytes(bw.to_bytes())
    return str(d)


def test_wrong_input_shape_dtype_and_names(tmp_path):
    m = ReferenceBackend.load(make(tmp_path))
    s = m.make_state()
    ok = {"x": np.ones((1, 4), np.float16), "ids": np.array([0, 1], np.int32)}
    m.predict(ok, s)
    with pytest.raises(MilInputError, match=r"input 'x' has shape \[1, 5\], expected \[1, 4\]"):
        m.predict({**ok, "x": np.ones((1, 5), np.float16)}, s)
    with pytest.raises(MilInputError, match=r"input 'ids' has dtype float32, expected int32"):
        m.predict({**ok, "ids": np.zeros(2, np.float32)}, s)
    with pytest.raises(MilInputError, match=r"input 'x' has dtype int64, expected fp16"):
        m.predict({**ok, "x": np.ones((1, 4), np.int64)}, s)
    with pytest.raises(MilInputError, match="missing input 'ids'"):
        m.predict({"x": ok["x"]}, s)
    with pytest.raises(MilInputError, match="unexpected input"):
        m.predict({**ok, "typo": ok["x"]}, s)
    with pytest.raises(MilInputError, match="make_state"):
        m.predict(ok)


def test_out_of_range_index_is_an_error_naming_the_op(tmp_path):
    m = ReferenceBackend.load(make(tmp_path))
    with pytest.raises(MilError, match=r"op gather \(g\)"):
        m.predict({"x": np.ones((1, 4), np.float16), "ids": np.array([0, 7], np.int32)}, m.make_state())


def test_state_from_a_model_with_another_spec_is_refused(tmp_path):
    a = ReferenceBackend.load(make(tmp_path, 3, "a"))
    b = ReferenceBackend.load(make(tmp_path, 5, "b"))
    same = ReferenceBackend.load(make(tmp_path, 3, "c"))
    inputs = {"x": np.ones((1, 4), np.float16), "ids": np.array([0, 1], np.int32)}
    same.predict(inputs, a.make_state())  # identical spec: shareable across files
    with pytest.raises(StateSpecError, match=r"cache \[5, 4\] fp16.*differs.*cache \[3, 4\] fp16"):
        a.predict(inputs, b.make_state())


def test_corrupt_weight_file_reported_at_load(tmp_path):
    path = make(tmp_path)
    wb = tmp_path / "m.mlmodelc" / "weights" / "weight.bin"
    data = bytearray(wb.read_bytes())
    data[64:68] = b"\x00\x00\x00\x00"
    wb.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match="weight.bin.*sentinel"):
        ReferenceBackend.load(path)
    wb.write_bytes(bytes(data[:100]))
    with pytest.raises(WeightFileError, match="weight.bin"):
        ReferenceBackend.load(path)


def test_corrupt_mlpackage_protobuf(tmp_path):
    pkg = tmp_path / "x.mlpackage" / "Data" / "com.apple.CoreML"
    pkg.mkdir(parents=True)
    (pkg / "model.mlmodel").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(MilError, match="model.mlmodel"):
        ReferenceBackend.load(str(tmp_path / "x.mlpackage"))


BASE = TEXT % (3, 3)
TOKENS = ["(", ")", "[", "]", "{", "}", "<", ">", ",", "=", ";", "->", "?", "tensor", "fp16", "int32",
          "BLOBFILE", "0x1.0p-3", "-1", "999999999999", "\"s\"", "state", "func", "x", "c", "ids"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 6), st.sampled_from(TOKENS + [""])),
                min_size=1, max_size=4))
def test_fuzz_mutated_model_mil(tmp_path, edits):
    text = BASE
    for pos, cut, tok in edits:
        pos = min(pos, len(text))
        text = text[:pos] + tok + text[pos + cut:]
    bw = BlobWriter()
    bw.add(np.eye(4, dtype=np.float16), "fp16")
    blob = tmp_path / "weights"
    blob.mkdir(exist_ok=True)
    (blob / "weight.bin").write_bytes(bw.to_bytes())
    try:
        prog = parse_mil_text(text, source="fuzz.mlmodelc", model_dir=str(tmp_path))
        from anemll_fast.backends.reference import ReferenceModel
        ReferenceModel(prog)
    except MilError:
        pass  # only our own exception types may come out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 127), st.integers(0, 255))
def test_fuzz_mutated_weight_header(tmp_path, pos, byte):
    d = tmp_path / f"f{pos}_{byte}.mlmodelc"
    if not d.exists():
        (d / "weights").mkdir(parents=True)
        (d / "model.mil").write_text(BASE)
        bw = BlobWriter()
        bw.add(np.eye(4, dtype=np.float16), "fp16")
        data = bytearray(bw.to_bytes())
        data[pos] = byte  # header (0..63) and the blob's metadata (64..127)
        (d / "weights" / "weight.bin").write_bytes(bytes(data))
    try:
        m = ReferenceBackend.load(str(d))
        m.predict({"x": np.ones((1, 4), np.float16), "ids": np.array([0, 1], np.int32)}, m.make_state())
    except MilError:
        pass
