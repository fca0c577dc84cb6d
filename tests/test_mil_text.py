"""model.mil text format: parsing every construct, real compiled samples, hand-written .mlmodelc."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from anemll_fast.backends.reference import ReferenceBackend
from anemll_fast.mil import MilFormatError, load_program, op_histogram
from anemll_fast.mil.blobfile import BlobWriter
from anemll_fast.mil.text_parser import parse_mil_text
from anemll_fast.mil.text_writer import program_to_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(os.path.dirname(REPO), "shared", "mil_samples")
needs_samples = pytest.mark.skipif(not os.path.isdir(SAMPLES), reason="../shared/mil_samples is absent")


def sample(name):
    with open(os.path.join(SAMPLES, name), encoding="utf-8") as f:
        return f.read()


def make_mlmodelc(tmp_path, text, blobs=None, weight_name="weights/weight.bin", meta=None):
    d = tmp_path / "m.mlmodelc"
    (d / "weights").mkdir(parents=True, exist_ok=True)
    (d / "model.mil").write_text(text, encoding="utf-8")
    if blobs is not None:
        (d / weight_name).write_bytes(blobs.to_bytes())
    if meta is not None:
        (d / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    (d / "coremldata.bin").write_bytes(b"\x00ignored")
    return str(d)


@needs_samples
def test_apple_sample_old_name_syntax_runs(tmp_path):
    path = make_mlmodelc(tmp_path, sample("apple_coremltools__add_model.mlmodelc__model.mil"))
    prog = load_program(path)
    assert prog.attributes["buildInfo"].data["coremltools-source-dialect"] == "TorchScript"
    assert prog.functions["main"].ops[0].name == "op_3_cast_fp16"
    m = ReferenceBackend.load(path)
    x, y = np.arange(10, dtype=np.float16).reshape(1, 10), np.full((1, 10), 0.5, np.float16)
    np.testing.assert_array_equal(m.predict({"x": x, "y": y})["var_3"], x * y)


@needs_samples
def test_oproj_sample_blobfile_at_model_path_weights_bin(tmp_path):
    w = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float16)
    blobs = BlobWriter()
    assert blobs.add(w, "fp16") == 64  # the offset the sample references
    path = make_mlmodelc(tmp_path, sample("joshuaswarren_ane-linux-experiments__oproj__model.mil"), blobs,
                         weight_name="weights.bin")
    m = ReferenceBackend.load(path)
    t0 = np.random.default_rng(2).standard_normal((375, 1024)).astype(np.float16)
    out = m.predict({"t0": t0})["t1"]
    want = (t0.astype(np.float32) @ w.astype(np.float32).T).astype(np.float16)
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-2)


@needs_samples
def test_model_a_sample_hex_float_and_tuple_return(tmp_path):
    prog = parse_mil_text(sample("joshuaswarren_ane-linux-experiments__model-A-correct.mil"))
    fn = prog.functions["main"]
    assert fn.outputs == ["attention_scores_1", "matmul_0"]
    assert float(fn.ops[0].attributes["val"].data) == 0.125
    rng = np.random.default_rng(3)
    m = ReferenceBackend.load(make_mlmodelc(tmp_path, sample("joshuaswarren_ane-linux-experiments__model-A-correct.mil")))
    q = rng.standard_normal((1, 8, 375, 128)).astype(np.float16)
    k = rng.standard_normal((1, 8, 375, 128)).astype(np.float16)
    p = rng.standard_normal((1, 8, 128, 749)).astype(np.float16)
    out = m.predict({"q_v": q, "k_headsT": k, "pos_kT": p})
    assert out["attention_scores_1"].shape == (1, 8, 375, 749)
    qs = (q.astype(np.float32) * 0.125).astype(np.float16).astype(np.float32)
    want = (qs @ np.swapaxes(k.astype(np.float32), -1, -2)).astype(np.float16)
    np.testing.assert_allclose(out["matmul_0"].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=5e-2)


@needs_samples
def test_partial_palettized_encoder_head_parses():
    """The real LUT-palettized sample is stored cut: parse its complete leading statements."""
    head = sample("joshuaswarren_ane-linux-experiments__encoder-island-cost__model.mil.chars_0-32000.partial")
    lines = head.split("\n")
    body = [ln for ln in lines[:-1] if ln.strip().endswith(";")]
    last = body[-1].split("=")[0].split()[-1]
    text = "\n".join(lines[:4]) + "\n" + "\n".join(body[1:]) + f"\n    }} -> ({last});\n}}\n"
    prog = parse_mil_text(text, read_weights=False)
    hist = prog.op_histogram()["main"]
    assert hist["conv"] >= 1 and hist["const"] > 10


@needs_samples
def test_partial_sample_tail_lut_statement_parses():
    tail = sample("joshuaswarren_ane-linux-experiments__encoder-island-cost__model.mil.chars_653663-659663.partial")
    stmts = [ln for ln in tail.split("\n")[1:] if "constexpr_lut_to_dense" in ln]
    text = ("program(1.3)\n{\n    func main<ios18>() {\n" + "\n".join(stmts) + "\n    } -> ("
            + stmts[0].split("=")[0].split()[-1] + ");\n}\n")
    prog = parse_mil_text(text, read_weights=False)
    op = [o for o in prog.functions["main"].ops if o.outputs[0].name == "projector_weight_to_fp16_palettized"][0]
    assert op.type == "constexpr_lut_to_dense"
    assert str(op.inputs["lut"][0].type) == "tensor<fp16, [40, 1, 16, 1]>"
    assert str(op.inputs["indices"][0].type) == "tensor<uint4, [640, 1024]>"


HAND_WRITTEN = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-version", "3520.5.1"}, {"who", "hand"}})]
{
    func infer<ios18>(tensor<fp16, [1, 4]> x, state<tensor<fp16, [2, 4]>> cache, tensor<int32, [1]> pos) {
        tensor<fp16, [4, 4]> w = const()[name = string("w"), val = tensor<fp16, [4, 4]>(BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(64)))];
        fp16 half = const()[name = tensor<string, []>("half"), val = fp16(0x1.0p-1)];
        tensor<fp16, [1, 4]> y = linear(x = x, weight = w)[name = string("y")];
        tensor<fp16, [1, 4]> z = mul(x = y, y = half)[name = string("z")];
        tensor<fp16, [2, 4]> c = read_state(input = cache)[name = string("c")];
        tensor<int32, [1]> zero = const()[name = string("zero"), val = tensor<int32, [1]>([0])];
        tensor<int32, [2]> b = concat(axis = int32(0), interleave = bool(false), values = (pos, zero))[name = string("b")];
        tensor<int32, [2]> e = add(x = b, y = tensor<int32, [2]>([1, 4]))[name = string("e")];
        tensor<fp16, [2, 4]> c2 = slice_update(x = c, update = z, begin = b, end = e)[name = string("c2")];
        write_state(data = c2, input = cache)[name = string("ws")];
        tensor<fp16, [2, 4]> c3 = read_state(input = cache)[name = string("c3")];
        tensor<fp16, [1, 2]> s0, tensor<fp16, [1, 2]> s1 = split(x = z, num_splits = int32(2), axis = int32(-1))[name = string("sp")];
        string mode = const()[name = string("mode"), val = string("EXACT")];
    } -> (z, c3, s1);
    func prefill<ios18>(tensor<fp16, [1, ?]> x) {
        tensor<fp16, [1, ?]> y = exp(x = x)[name = string("y")];
    } -> (y);
}
"""


def test_hand_written_mlmodelc_every_construct(tmp_path):
    w = np.arange(16, dtype=np.float16).reshape(4, 4) / 8
    blobs = BlobWriter()
    blobs.add(w, "fp16")
    meta = [{"defaultFunctionName": "infer",
             "functions": [{"name": "prefill", "inputSchema": [{"name": "x", "shapeRange": "[[1, 1], [1, 8]]"}]}]}]
    path = make_mlmodelc(tmp_path, HAND_WRITTEN, blobs, meta=meta)
    assert op_histogram(path) == {
        "infer": {"const": 4, "linear": 1, "mul": 1, "read_state": 2, "concat": 1, "add": 1, "slice_update": 1,
                  "write_state": 1, "split": 1},
        "prefill": {"exp": 1}}
    m = ReferenceBackend.load(path)
    assert m.function_name == "infer" and m.functions == ["infer", "prefill"]
    st = m.make_state()
    x = np.array([[1, 2, 3, 4]], np.float16)
    o = m.predict({"x": x, "pos": np.array([1], np.int32)}, st)
    z = ((x.astype(np.float32) @ w.astype(np.float32).T) * 0.5).astype(np.float16)
    np.testing.assert_array_equal(o["z"], z)
    np.testing.assert_array_equal(o["c3"], np.stack([np.zeros(4, np.float16), z[0]]))
    np.testing.assert_array_equal(o["s1"], z[:, 2:])
    pre = m.function("prefill")
    for n in (1, 5, 8):  # flexible dim within the range from metadata.json
        v = np.linspace(0, 1, n, dtype=np.float16)[None]
        np.testing.assert_array_equal(pre.predict({"x": v})["y"], np.exp(v.astype(np.float32)).astype(np.float16))


def test_writer_text_roundtrip_is_stable():
    prog = parse_mil_text(HAND_WRITTEN, read_weights=False)
    text = program_to_text(prog)
    again = parse_mil_text(text, read_weights=False)
    assert again.op_histogram() == prog.op_histogram()
    assert program_to_text(again) == text


@pytest.mark.parametrize("text, culprit", [
    ("program(1.3)\n{\n", "line 3"),
    ("program(1.3)\n{\n func main<ios18>(tensor<fp16, [1]> x) {\n } -> (x)\n}\n", "expected ';'"),
    ("program(1.3)\n{\n func main<ios18>(tensor<fp99, [1]> x) {\n } -> (x);\n}\n", "fp99"),
    ("program(1.3)\n{\n func main<ios18>(fp16 x) {\n  fp16 y = const()[name = string(\"y\")];\n } -> (y);\n}\n", "val"),
    ("program(1.3)\n{\n func main<ios18>(fp16 x) {\n  tensor<int32, [3]> y = const()[val = tensor<int32, [3]>([1, 2])];\n } -> (y);\n}\n", "needs 3 values"),
    ("program(1.3)\n{\n func main<ios18>(fp16 x) {\n  fp16 y = exp(x = x) $\n } -> (y);\n}\n", "unexpected character"),
])
def test_malformed_model_mil_is_a_clear_error(text, culprit):
    with pytest.raises(MilFormatError, match=culprit):
        parse_mil_text(text, source="bad.mlmodelc")


def test_undefined_variable_named_at_load(tmp_path):
    text = "program(1.3)\n{\n func main<ios18>(tensor<fp32, [2]> x) {\n  tensor<fp32, [2]> y = add(x = x, y = nope)[name = string(\"y\")];\n } -> (y);\n}\n"
    with pytest.raises(MilFormatError, match="nope"):
        ReferenceBackend.load(make_mlmodelc(tmp_path, text))


def test_unknown_op_reported_at_load_with_function_and_file(tmp_path):
    text = ("program(1.3)\n{\n func main<ios18>(tensor<fp32, [2]> x) {\n  tensor<fp32, [2]> y = exp(x = x);\n } -> (y);\n"
            " func other<ios18>(tensor<fp32, [2]> x) {\n  tensor<fp32, [2]> y = frobnicate(x = x);\n } -> (y);\n}\n")
    from anemll_fast.mil import UnsupportedOpError
    path = make_mlmodelc(tmp_path, text)
    with pytest.raises(UnsupportedOpError, match=r"frobnicate") as e:
        ReferenceBackend.load(path)  # even when the default function would run fine
    assert "'other'" in str(e.value) and "m.mlmodelc" in str(e.value)


INPLACE = """program(1.3)
{
    func main<ios18>(tensor<fp32, [1, 3]> u, state<tensor<fp32, [2, 3]>> s) {
        tensor<fp32, [2, 3]> c = read_state(input = s)[name = string("c")];
        tensor<fp32, [2, 3]> c1 = slice_update(x = c, update = u, begin = tensor<int32, [2]>([0, 0]), end = tensor<int32, [2]>([1, 3]))[name = string("c1")];
        tensor<fp32, [1, 3]> v = slice_by_index(x = c1, begin = tensor<int32, [2]>([0, 0]), end = tensor<int32, [2]>([1, 3]))[name = string("v")];
        tensor<fp32, [1, 3]> u2 = mul(x = v, y = fp32(2))[name = string("u2")];
        tensor<fp32, [2, 3]> c2 = slice_update(x = c1, update = u2, begin = tensor<int32, [2]>([1, 0]), end = tensor<int32, [2]>([2, 3]))[name = string("c2")];
        %s
    } -> (%s);
}
"""


@pytest.mark.parametrize("tail, outs, inplace, state_after", [
    # KV-cache pattern: a chain of updates written back once: every update is done in place
    ('write_state(data = c2, input = s)[name = string("w")];', "u2", 2, [[1, 2, 3], [2, 4, 6]]),
    # a view of the first update is returned: the second update must not write into that buffer
    ('write_state(data = c2, input = s)[name = string("w")];', "v", 1, [[1, 2, 3], [2, 4, 6]]),
    # never written back: the state must stay untouched (only the private copy is updated in place)
    ("", "c2", 1, [[0, 0, 0], [0, 0, 0]]),
    # the state is read again before the write: the second read must see the old contents
    ('tensor<fp32, [2, 3]> again = read_state(input = s)[name = string("again")];\n'
     '        write_state(data = c2, input = s)[name = string("w")];', "again", 1, [[1, 2, 3], [2, 4, 6]]),
    # the original read is used after the updates: it must keep the old contents
    ('write_state(data = c2, input = s)[name = string("w")];\n'
     '        tensor<fp32, [2, 3]> old = add(x = c, y = fp32(0))[name = string("old")];', "old", 1,
     [[1, 2, 3], [2, 4, 6]]),
])
def test_in_place_state_updates_only_when_safe(tmp_path, tail, outs, inplace, state_after):
    m = ReferenceBackend.load(make_mlmodelc(tmp_path, INPLACE % (tail, outs)))
    assert m._plan.inplace_count == inplace
    st = m.make_state()
    o = m.predict({"u": np.array([[1, 2, 3]], np.float32)}, st)
    np.testing.assert_array_equal(st.read("s"), np.array(state_after, np.float32))
    if outs in ("again", "old"):
        np.testing.assert_array_equal(o[outs], np.zeros((2, 3), np.float32))
    if outs == "v":
        np.testing.assert_array_equal(o["v"], np.array([[1, 2, 3]], np.float32))
    if outs == "c2":
        np.testing.assert_array_equal(o["c2"], np.array([[1, 2, 3], [2, 4, 6]], np.float32))
