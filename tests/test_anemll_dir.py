"""ModelConfig.from_anemll_dir on ANEMLL-layout directories built by the tests."""
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

import anemll_stub
from anemll_fast.config import ModelConfig
from anemll_fast.errors import ConfigError
from anemll_fast.mil import op_histogram
from anemll_fast.model_io import read_model_io
from conftest import SHARED


@pytest.fixture(scope="session")
def v034(tmp_path_factory):
    """0.3.4 layout: two chunks, meta names .mlmodelc, files are .mlpackage."""
    return anemll_stub.build(tmp_path_factory.mktemp("v034") / "m", num_chunks=2)


@pytest.fixture(scope="session")
def v035(tmp_path_factory):
    """0.3.5 layout: one chunk, argmax head, state longer than the context, update_mask."""
    return anemll_stub.build(
        tmp_path_factory.mktemp("v035") / "m", prefix="llama", num_chunks=1, ctx=16, state_len=32,
        argmax=True, update_mask=True, meta_version="0.3.5", lut_ffn=4, lut_lmhead=6, parts=8,
        vocab=128,
    )


@pytest.fixture(scope="session")
def compiled(v034, tmp_path_factory):
    return anemll_stub.compile_dir(v034, tmp_path_factory.mktemp("compiled") / "m")


def copy_dir(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_v034_two_chunks(v034):
    config = ModelConfig.from_anemll_dir(v034)
    assert config.num_chunks == 2
    assert config.ffn_execution == "unified"
    assert config.prefill_mode == "batch"
    assert config.shapes.to_dict() == {"batch_size": 4, "context_length": 16, "hidden_size": 16, "vocab_size": 64}
    assert [c.file_path for c in config.ffn_prefill] == [
        "qwen_FFN_PF_chunk_01of02.mlpackage", "qwen_FFN_PF_chunk_02of02.mlpackage"]
    assert [c.function for c in config.ffn_prefill] == ["prefill", "prefill"]
    assert [c.function for c in config.ffn_infer] == ["infer", "infer"]
    assert config.ffn_prefill[0].outputs["output_hidden_states"].shape == (1, 4, 16)
    assert config.ffn_prefill[1].outputs["output_hidden_states"].shape == (1, 1, 16)  # last chunk
    assert config.ffn_infer[0].states["model_model_kv_cache_0"].shape == (4, 1, 16, 8)
    assert config.logits_outputs == ["logits1", "logits2", "logits3", "logits4"]
    emb_in = config.embeddings.inputs["input_ids"]
    assert set(emb_in.all_shapes) == {(1, 4), (1, 1)}
    assert set(config.embeddings.outputs["hidden_states"].all_shapes) == {(1, 4, 16), (1, 1, 16)}
    assert config.model_info["anemll_version"] == "0.3.4"
    config.validate()
    config.validate_wiring()
    # The config survives JSON with its directory.
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    again.validate()


def test_v035_argmax_update_mask_long_state(v035):
    config = ModelConfig.from_anemll_dir(v035)
    assert config.argmax_in_model and config.logits_parts == 8
    assert config.shapes.vocab_size == 128  # argmax heads have no logits: meta.yaml gives it
    assert config.shapes.context_length == 16  # from the mask ...
    assert config.state_length == 32  # ... not from the longer state
    assert config.has_update_mask
    assert config.embeddings.file_path == "llama_embeddings.mlpackage"
    assert config.lm_head.file_path == "llama_lm_head_lut6.mlpackage"
    assert config.ffn_infer[0].file_path == "llama_FFN_PF_lut4_chunk_01of01.mlpackage"
    assert config.model_info["lm_head_chunk_sizes"] == [16] * 8
    config.validate_wiring()


def test_embeddings_fall_back_to_name_without_lut(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    meta = yaml.safe_load((d / "meta.yaml").read_text())
    meta["model_info"]["parameters"]["lut_embeddings"] = 8
    del meta["model_info"]["parameters"]["embeddings"]
    (d / "meta.yaml").write_text(yaml.safe_dump(meta))
    config = ModelConfig.from_anemll_dir(d)
    assert config.embeddings.file_path == "qwen_embeddings.mlpackage"


def test_compiled_mlmodelc_parts(compiled, v034):
    config = ModelConfig.from_anemll_dir(compiled)
    reference = ModelConfig.from_anemll_dir(v034)
    assert config.embeddings.file_path.endswith(".mlmodelc")
    for (label, a), (_, b) in zip(config.components(), reference.components()):
        assert a.inputs == b.inputs, label
        assert a.outputs == b.outputs, label
        assert a.states == b.states, label
        assert a.function == b.function, label
    assert config.shapes == reference.shapes
    config.validate_wiring()


def test_zipped_mlmodelc_parts_are_unpacked(compiled, tmp_path):
    d = tmp_path / "zipped"
    d.mkdir()
    for item in compiled.iterdir():
        if item.suffix == ".mlmodelc":
            with zipfile.ZipFile(d / (item.name + ".zip"), "w") as zf:
                for f in item.rglob("*"):
                    zf.write(f, f"{item.name}/{f.relative_to(item)}")
        else:
            shutil.copy(item, d / item.name)
    config = ModelConfig.from_anemll_dir(d)
    assert (d / config.lm_head.file_path / "model.mil").is_file()
    assert config.num_chunks == 2


def test_directory_without_meta_yaml(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    (d / "meta.yaml").unlink()
    config = ModelConfig.from_anemll_dir(d)
    assert config.num_chunks == 2 and config.logits_parts == 4


def test_op_histograms(v034, compiled):
    hist = op_histogram(v034 / "qwen_FFN_PF_chunk_01of02.mlpackage")
    assert set(hist) == {"infer", "prefill"}
    assert hist["infer"]["read_state"] == 1 and hist["infer"]["write_state"] == 1
    compiled_hist = op_histogram(compiled / "qwen_lm_head.mlmodelc")
    assert compiled_hist == {"main": {"identity": 4}}


@pytest.mark.skipif(not (SHARED / "mil_samples").is_dir(), reason="../shared/mil_samples is absent")
@pytest.mark.parametrize("sample, n_in, n_out", [
    ("apple_coremltools__add_model.mlmodelc__model.mil", 2, 1),
    ("joshuaswarren_ane-linux-experiments__model-A-correct.mil", 3, 2),
    ("joshuaswarren_ane-linux-experiments__oproj__model.mil", 1, 1),
])
def test_interface_of_real_compiled_model_mil(tmp_path, sample, n_in, n_out):
    bundle = tmp_path / "m.mlmodelc"
    bundle.mkdir()
    shutil.copy(SHARED / "mil_samples" / sample, bundle / "model.mil")
    io = read_model_io(bundle)
    fio = io.function()
    assert io.default_function == "main" and not io.multifunction
    assert len(fio.inputs) == n_in and len(fio.outputs) == n_out
    for spec in list(fio.inputs.values()) + list(fio.outputs.values()):
        assert spec.data_type in ("FLOAT16", "FLOAT32") and all(d > 0 for d in spec.shape)


def test_enumerated_shapes_from_coremlc_metadata(compiled):
    """coremlc writes flexibility as "1 × 1 | 1 × 4"; the signature has `?`."""
    io = read_model_io(compiled / "qwen_embeddings.mlmodelc")
    spec = io.function().inputs["input_ids"]
    assert spec.shape == (1, 4) and set(spec.all_shapes) == {(1, 4), (1, 1)}
    assert set(io.function().outputs["hidden_states"].all_shapes) == {(1, 4, 16), (1, 1, 16)}


# -------------------------------------------------------------- bad input
def _meta(d: Path):
    return yaml.safe_load((d / "meta.yaml").read_text())


def _write_meta(d: Path, meta):
    (d / "meta.yaml").write_text(yaml.safe_dump(meta))


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_anemll_dir(tmp_path / "nope")


def test_invalid_yaml(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    (d / "meta.yaml").write_text("model_info: [unclosed\n")
    with pytest.raises(ConfigError, match="meta.yaml: invalid YAML"):
        ModelConfig.from_anemll_dir(d)


def test_meta_without_parameters(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    _write_meta(d, {"model_info": {"name": "x"}})
    with pytest.raises(ConfigError, match="model_info.parameters"):
        ModelConfig.from_anemll_dir(d)


def test_meta_bad_number(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    meta = _meta(d)
    meta["model_info"]["parameters"]["num_chunks"] = "two"
    _write_meta(d, meta)
    with pytest.raises(ConfigError, match="num_chunks.*'two'"):
        ModelConfig.from_anemll_dir(d)


def test_monolithic_refused(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    meta = _meta(d)
    meta["model_info"]["model_type"] = "monolithic"
    _write_meta(d, meta)
    with pytest.raises(ConfigError, match="monolithic"):
        ModelConfig.from_anemll_dir(d)


def test_missing_part(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    shutil.rmtree(d / "qwen_lm_head.mlpackage")
    with pytest.raises(ConfigError, match="lm_head 'qwen_lm_head.mlmodelc' not found"):
        ModelConfig.from_anemll_dir(d)


def test_missing_chunk(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    shutil.rmtree(d / "qwen_FFN_PF_chunk_02of02.mlpackage")
    with pytest.raises(ConfigError, match="qwen_FFN_PF_chunk_02of02"):
        ModelConfig.from_anemll_dir(d)


def test_num_chunks_disagrees_with_files(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    shutil.copytree(d / "qwen_FFN_PF_chunk_01of02.mlpackage", d / "qwen_FFN_PF_chunk_01of03.mlpackage")
    with pytest.raises(ConfigError, match="num_chunks is 2.*3"):
        ModelConfig.from_anemll_dir(d)


def test_chunk_without_prefill_function(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    target = d / "qwen_FFN_PF_chunk_02of02.mlpackage"
    shutil.rmtree(target)
    shutil.copytree(d / "qwen_lm_head.mlpackage", target)
    with pytest.raises(ConfigError, match="chunk_02of02"):
        ModelConfig.from_anemll_dir(d)


def test_corrupt_spec(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    spec = d / "qwen_lm_head.mlpackage" / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec.write_bytes(b"\x0a\xff\xff\xff garbage")
    with pytest.raises(ConfigError, match="model.mlmodel: not a valid Core ML model protobuf"):
        ModelConfig.from_anemll_dir(d)


def test_corrupt_manifest(v034, tmp_path):
    d = copy_dir(v034, tmp_path)
    (d / "qwen_lm_head.mlpackage" / "Manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="Manifest.json: cannot find the root model"):
        ModelConfig.from_anemll_dir(d)


def test_compiled_bad_metadata_and_model_mil(compiled, tmp_path):
    d = copy_dir(compiled, tmp_path)
    (d / "qwen_lm_head.mlmodelc" / "metadata.json").write_text("[{")
    with pytest.raises(ConfigError, match="qwen_lm_head.mlmodelc/metadata.json: not valid JSON"):
        ModelConfig.from_anemll_dir(d)
    shutil.rmtree(d)
    d = copy_dir(compiled, tmp_path)
    (d / "qwen_lm_head.mlmodelc" / "model.mil").write_text("program(1.3)\n{\n}\n")
    with pytest.raises(ConfigError, match="qwen_lm_head.mlmodelc: the program has no functions"):
        ModelConfig.from_anemll_dir(d)
    (d / "qwen_lm_head.mlmodelc" / "model.mil").write_text(
        "program(1.3)\n{\n func main<ios18>(tensor<fp16, [1, 1, 16]> hidden_states) {\n } -> (logits1);\n}\n")
    with pytest.raises(ConfigError, match="returns 'logits1', which is never defined"):
        ModelConfig.from_anemll_dir(d)


def test_read_model_io_rejects_other_files(tmp_path):
    (tmp_path / "x.onnx").write_text("")
    with pytest.raises(ConfigError, match="not a Core ML model"):
        read_model_io(tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="does not exist"):
        read_model_io(tmp_path / "y.mlpackage")


def test_config_json_of_dir_is_valid_json(v035):
    data = json.loads(ModelConfig.from_anemll_dir(v035).to_json())
    assert data["components"]["lm_head"]["outputs"]["argmax_idx"]["data_type"] == "INT32"
