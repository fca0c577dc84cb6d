"""ModelConfig: JSON schema, round trips, detection, validation errors."""
import copy
import json
from pathlib import Path

import pytest

from anemll_fast.config import ComponentConfig, ModelConfig, TensorSpec, canonical_dtype
from anemll_fast.errors import ConfigError
from anemll_fast.layout import anemll_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def qwen_like(**kw):
    args = dict(prefix="qwen", hidden_size=64, num_layers=4, num_kv_heads=2, head_dim=16,
                vocab_size=256, context_length=32, batch_size=8, num_chunks=2, split_lm_head=4)
    args.update(kw)
    return anemll_config(**args)


def make_files(config, root: Path):
    """Empty stand-ins for the files a config names (for path checks only)."""
    for _, comp in config.components():
        (root / comp.file_path).mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------ schema
def test_candle_coreml_style_json_loads_and_round_trips(tmp_path):
    data = {
        "model_info": {"model_id": "x/y", "model_type": "qwen"},
        "shapes": {"batch_size": 64, "context_length": 512, "hidden_size": 1024, "vocab_size": 151936},
        "components": {
            "embeddings": {
                "file_path": "qwen_embeddings.mlmodelc",
                "inputs": {"input_ids": {"name": "input_ids", "shape": [1, 64], "data_type": "INT32"}},
                "outputs": {"hidden_states": {"name": "hidden_states", "shape": [1, 64, 1024], "data_type": "FLOAT16"}},
                "functions": [],
            },
            "ffn_prefill": {
                "file_path": "qwen_FFN_PF.mlmodelc",
                "inputs": {"hidden_states": {"name": "hidden_states", "shape": [1, 64, 1024], "data_type": "FLOAT16"}},
                "outputs": {"output_hidden_states": {"name": "output_hidden_states", "shape": [1, 1, 1024], "data_type": "FLOAT16"}},
                "functions": ["prefill", "infer"],
            },
            "ffn_infer": {
                "file_path": "qwen_FFN_PF.mlmodelc",
                "inputs": {"hidden_states": {"name": "hidden_states", "shape": [1, 1, 1024], "data_type": "FLOAT16"}},
                "outputs": {"output_hidden_states": {"name": "output_hidden_states", "shape": [1, 1, 1024], "data_type": "FLOAT16"}},
                "functions": ["prefill", "infer"],
            },
            "lm_head": {
                "file_path": "qwen_lm_head.mlmodelc",
                "inputs": {"hidden_states": {"name": "hidden_states", "shape": [1, 1, 1024], "data_type": "FLOAT16"}},
                "outputs": {"logits": {"name": "logits", "shape": [1, 1, 151936], "data_type": "FLOAT32"}},
                "functions": [],
            },
        },
        "naming": {"embeddings_pattern": "*_embeddings.mlmodelc"},
    }
    config = ModelConfig.from_dict(data)
    assert config.ffn_execution == "unified"
    assert config.prefill_mode == "batch"
    assert config.logits_outputs == ["logits"] and config.logits_parts == 1
    assert config.num_chunks == 1
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert again.to_dict()["naming"] == data["naming"]  # unknown sections survive
    path = tmp_path / "c.json"
    config.to_json(path)
    assert ModelConfig.from_json(path) == config


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_ready_configs_validate_on_shapes_and_match_their_generator(name):
    import importlib.util

    config = ModelConfig.from_json(CONFIGS / f"{name}.json")
    config.validate(check_files=False)
    config.validate_wiring()
    spec = importlib.util.spec_from_file_location("make_configs", CONFIGS / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert config.to_dict() == module.build_all()[name].to_dict()


def test_ready_configs_cover_the_published_releases():
    names = {p.stem for p in CONFIGS.glob("*.json")}
    assert {"anemll-qwen3-0.6b-ctx512-0.3.4", "anemll-qwen3-0.6b-lut888-ctx512-0.3.4",
            "anemll-qwen2.5-0.5b-ctx512-0.3.4", "anemll-llama-3.2-1b-ctx512-0.3.4"} <= names
    qwen3 = ModelConfig.from_json(CONFIGS / "anemll-qwen3-0.6b-ctx512-0.3.4.json")
    assert qwen3.shapes.hidden_size == 1024 and qwen3.logits_parts == 16
    assert qwen3.lm_head_chunk_sizes == [9496] * 16


# Facts of the published releases, written down independently of configs/make_configs.py: dimensions from
# each source checkpoint's config.json (Qwen/Qwen3-0.6B, Qwen/Qwen2.5-0.5B-Instruct, meta-llama/Llama-3.2-1B),
# file names as the releases on the Hub spell them. The KV state of every chunk holds keys and values of all
# layers: [2 * layers, kv_heads, context, head_dim].
RELEASE_FACTS = {
    "anemll-qwen3-0.6b-ctx512-0.3.4": dict(
        hidden=1024, layers=28, kv_heads=8, head_dim=128, vocab=151936, parts=16, chunks=1,
        files=("qwen_embeddings.mlmodelc", "qwen_FFN_PF_lut4_chunk_01of01.mlmodelc", "qwen_lm_head_lut6.mlmodelc")),
    "anemll-qwen3-0.6b-lut888-ctx512-0.3.4": dict(
        hidden=1024, layers=28, kv_heads=8, head_dim=128, vocab=151936, parts=16, chunks=1,
        files=("qwen_embeddings_lut8.mlmodelc", "qwen_FFN_PF_lut8_chunk_01of01.mlmodelc",
               "qwen_lm_head_lut8.mlmodelc")),
    "anemll-qwen2.5-0.5b-ctx512-0.3.4": dict(
        hidden=896, layers=24, kv_heads=2, head_dim=64, vocab=151936, parts=16, chunks=1,
        files=("qwen25_embeddings.mlmodelc", "qwen25_FFN_PF_lut4_chunk_01of01.mlmodelc",
               "qwen25_lm_head_lut6.mlmodelc")),
    "anemll-llama-3.2-1b-ctx512-0.3.4": dict(
        hidden=2048, layers=16, kv_heads=8, head_dim=64, vocab=128256, parts=8, chunks=2,
        files=("llama_embeddings.mlmodelc", "llama_FFN_PF_lut4_chunk_01of02.mlmodelc", "llama_lm_head_lut6.mlmodelc")),
}


@pytest.mark.parametrize("name", sorted(RELEASE_FACTS))
def test_ready_configs_agree_with_the_published_checkpoints(name):
    f = RELEASE_FACTS[name]
    c = ModelConfig.from_json(CONFIGS / f"{name}.json")
    assert (c.shapes.hidden_size, c.shapes.vocab_size, c.shapes.context_length, c.shapes.batch_size) == \
        (f["hidden"], f["vocab"], 512, 64)
    assert (c.embeddings.file_path, c.ffn_prefill[0].file_path, c.lm_head.file_path) == f["files"]
    assert c.num_chunks == f["chunks"] and c.logits_parts == f["parts"]
    assert c.lm_head_chunk_sizes == [f["vocab"] // f["parts"]] * f["parts"]
    state = (2 * f["layers"], f["kv_heads"], 512, f["head_dim"])
    for comp in c.ffn_prefill + c.ffn_infer:
        assert [s.shape for s in comp.states.values()] == [state], comp.file_path
    H = f["hidden"]
    assert c.embeddings.outputs["hidden_states"].shape == (1, 64, H)
    assert c.ffn_infer[0].inputs["hidden_states"].shape == (1, 1, H)
    assert c.ffn_prefill[0].inputs["causal_mask"].shape == (1, 1, 64, 512)
    assert c.lm_head.inputs["hidden_states"].shape == (1, 1, H)


def test_chunks_states_parts_round_trip():
    config = qwen_like(num_chunks=2, split_lm_head=4, state_length=64)
    data = json.loads(config.to_json())
    assert isinstance(data["components"]["ffn_prefill"], list) and len(data["components"]["ffn_prefill"]) == 2
    again = ModelConfig.from_dict(data)
    assert again == config
    assert again.num_chunks == 2
    assert again.ffn_prefill[1].outputs["output_hidden_states"].shape == (1, 1, 64)  # last chunk
    assert again.ffn_prefill[0].outputs["output_hidden_states"].shape == (1, 8, 64)
    assert again.ffn_infer[0].states["model_model_kv_cache_0"].shape == (8, 2, 64, 16)
    assert again.state_length == 64 and again.shapes.context_length == 32
    assert again.logits_outputs == ["logits1", "logits2", "logits3", "logits4"]
    assert again.lm_head_chunk_sizes == [64] * 4
    assert [c.function for c in again.ffn_prefill] == ["prefill", "prefill"]


def test_logits_parts_sorted_numerically():
    config = qwen_like(split_lm_head=16, vocab_size=16 * 8)
    # Insert the outputs out of order: logits10 must come after logits9.
    outs = config.lm_head.outputs
    config.lm_head.outputs = dict(sorted(outs.items()))
    assert config.logits_outputs == [f"logits{i}" for i in range(1, 17)]


def test_argmax_head_detected():
    config = qwen_like(argmax_in_model=True)
    assert config.argmax_in_model and config.logits_outputs == []
    assert config.logits_parts == 4
    assert ModelConfig.from_json(config.to_json()).argmax_in_model


def test_split_ffn_and_sequential_prefill_detected():
    config = qwen_like(num_chunks=1)
    data = config.to_dict()
    pf = data["components"]["ffn_prefill"]
    pf["file_path"] = "qwen_prefill_chunk_01of01.mlmodelc"
    pf["inputs"]["hidden_states"]["shape"] = [1, 1, 64]
    data.pop("ffn_execution")
    split = ModelConfig.from_dict(data)
    assert split.ffn_execution == "split"
    assert split.prefill_mode == "sequential"
    assert config.ffn_execution == "unified" and config.prefill_mode == "batch"


def test_update_mask_input_detected():
    config = qwen_like()
    assert not config.has_update_mask
    config.ffn_prefill[0].inputs["update_mask"] = TensorSpec("update_mask", (1, 1, 32, 8), "FLOAT16")
    assert ModelConfig.from_json(config.to_json()).has_update_mask


def test_dtype_spellings():
    assert canonical_dtype("fp16") == "FLOAT16"
    assert canonical_dtype("Float32") == "FLOAT32"
    assert canonical_dtype("DOUBLE") == "FLOAT64"
    assert canonical_dtype("int32") == "INT32"
    assert TensorSpec("x", (1,), "FLOAT16").np_dtype.itemsize == 2


# -------------------------------------------------------------- bad input
def _data():
    return qwen_like().to_dict()


def _expect(data, *fragments, model_dir=None, wiring=False, files=True):
    with pytest.raises(ConfigError) as err:
        config = ModelConfig.from_dict(data, model_dir=model_dir)
        config.validate(check_files=files)
        if wiring:
            config.validate_wiring()
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    return err.value


def test_missing_component():
    data = _data()
    del data["components"]["lm_head"]
    _expect(data, "components.lm_head", "missing component", files=False)
    data = _data()
    del data["components"]["ffn_infer"]
    _expect(data, "components.ffn_infer", files=False)


def test_unknown_component_role():
    data = _data()
    data["components"]["decoder"] = data["components"]["lm_head"]
    _expect(data, "decoder", files=False)


@pytest.mark.parametrize("key", ["batch_size", "context_length", "hidden_size", "vocab_size"])
def test_non_positive_shapes(key):
    data = _data()
    data["shapes"][key] = 0
    _expect(data, f"shapes.{key}", "positive", files=False)


def test_non_positive_tensor_dimension_names_component_tensor_field():
    data = _data()
    data["components"]["ffn_infer"][1]["inputs"]["causal_mask"]["shape"] = [1, 1, 0, 32]
    _expect(data, "components.ffn_infer[1].inputs.causal_mask.shape", files=False)


def test_unknown_dtype():
    data = _data()
    data["components"]["lm_head"]["outputs"]["logits2"]["data_type"] = "BFLOAT17"
    _expect(data, "components.lm_head.outputs.logits2.data_type", "BFLOAT17")


def test_malformed_tensor_entries():
    data = _data()
    del data["components"]["embeddings"]["inputs"]["input_ids"]["shape"]
    _expect(data, "components.embeddings.inputs.input_ids.shape")
    data = _data()
    data["components"]["embeddings"]["inputs"]["input_ids"]["name"] = "ids"
    _expect(data, "components.embeddings.inputs.input_ids", "'ids'")
    data = _data()
    data["components"]["embeddings"]["inputs"]["input_ids"]["shape"] = [1, "64"]
    _expect(data, "components.embeddings.inputs.input_ids.shape")


def test_inconsistent_ffn_execution():
    data = _data()
    data["ffn_execution"] = "split"
    _expect(data, "ffn_execution", "unified")
    data["ffn_execution"] = "sideways"
    _expect(data, "ffn_execution", "sideways")


def test_file_path_escaping_model_dir(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "outside.mlmodelc").mkdir()
    data = _data()
    data["components"]["lm_head"]["file_path"] = "../outside.mlmodelc"
    _expect(data, "components.lm_head.file_path", "escapes", model_dir=model_dir)
    data["components"]["lm_head"]["file_path"] = str(tmp_path / "outside.mlmodelc")
    _expect(data, "components.lm_head.file_path", "escapes", model_dir=model_dir)
    # A sibling whose name starts with the model directory's: a string-prefix check would let it through.
    (tmp_path / "model_evil.mlmodelc").mkdir()
    data["components"]["lm_head"]["file_path"] = "../model_evil.mlmodelc"
    _expect(data, "components.lm_head.file_path", "escapes", model_dir=model_dir)
    # Without a model directory, such paths are refused outright.
    data["components"]["lm_head"]["file_path"] = "../outside.mlmodelc"
    _expect(data, "components.lm_head.file_path", "relative", files=False)


def test_symlink_escaping_model_dir(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "elsewhere.mlmodelc").mkdir()
    config = qwen_like()
    make_files(config, model_dir)
    import shutil
    shutil.rmtree(model_dir / config.lm_head.file_path)
    (model_dir / config.lm_head.file_path).symlink_to(tmp_path / "elsewhere.mlmodelc")
    _expect(config.to_dict(), "components.lm_head.file_path", "escapes", model_dir=model_dir)


def test_missing_files(tmp_path):
    config = qwen_like()
    make_files(config, tmp_path)
    ModelConfig.from_dict(config.to_dict(), model_dir=tmp_path).validate()
    missing = tmp_path / config.ffn_infer[1].file_path
    missing.rmdir()
    _expect(config.to_dict(), "components.ffn_prefill[1].file_path", "does not exist", model_dir=tmp_path)


def test_chunk_count_mismatch():
    data = _data()
    data["components"]["ffn_infer"] = data["components"]["ffn_infer"][:1]
    _expect(data, "ffn_prefill has 2 chunks", "ffn_infer has 1", files=False)


def test_function_not_in_file():
    data = _data()
    data["components"]["ffn_prefill"][0]["function"] = "prefil"
    _expect(data, "components.ffn_prefill[0].function", "prefil", files=False)


def test_invalid_json_text_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_json('{"shapes": ')
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(bad)


# ------------------------------------------------------------------ wiring
def test_wiring_accepts_consistent_models():
    for kw in ({}, {"num_chunks": 1}, {"argmax_in_model": True}, {"state_length": 64}):
        qwen_like(**kw).validate_wiring()


def test_wiring_hidden_size_mismatch_between_chunks():
    data = _data()
    data["components"]["ffn_infer"][1]["inputs"]["hidden_states"]["shape"] = [1, 1, 48]
    _expect(data, "components.ffn_infer[1].inputs.hidden_states.shape", "ffn_infer[0]", wiring=True, files=False)


def test_wiring_head_input_mismatch():
    data = _data()
    data["components"]["lm_head"]["inputs"]["hidden_states"]["data_type"] = "FLOAT32"
    _expect(data, "components.lm_head.inputs.hidden_states.data_type", wiring=True, files=False)


def test_wiring_embeddings_cannot_feed_first_chunk():
    data = _data()
    data["components"]["embeddings"]["outputs"]["hidden_states"]["shape"] = [1, 8, 32]
    data["components"]["embeddings"]["outputs"]["hidden_states"]["enumerated_shapes"] = [[1, 8, 32], [1, 1, 32]]
    _expect(data, "components.ffn_prefill[0].inputs.hidden_states.shape", "embeddings", wiring=True, files=False)
    data = _data()
    data["components"]["embeddings"]["outputs"]["hidden_states"]["enumerated_shapes"] = [[1, 8, 64]]
    _expect(data, "components.ffn_infer[0].inputs.hidden_states.shape", "[1, 1, 64]", wiring=True, files=False)


def test_wiring_missing_link_tensor():
    data = _data()
    del data["components"]["ffn_infer"][0]["inputs"]["hidden_states"]
    _expect(data, "components.ffn_infer[0].inputs.hidden_states", "missing", wiring=True, files=False)


def test_wiring_state_specs_must_agree_across_chunks_and_functions():
    data = _data()
    data["components"]["ffn_prefill"][1]["states"]["model_model_kv_cache_0"]["shape"] = [8, 2, 16, 16]
    _expect(data, "components.ffn_prefill[1].states.model_model_kv_cache_0.shape", wiring=True, files=False)
    data = _data()
    data["components"]["ffn_infer"][0]["states"]["model_model_kv_cache_0"]["data_type"] = "FLOAT32"
    _expect(data, "components.ffn_infer[0].states.model_model_kv_cache_0.data_type", wiring=True, files=False)
    data = _data()
    st = data["components"]["ffn_infer"][1]["states"]
    st["other"] = copy.deepcopy(st["model_model_kv_cache_0"])
    st["other"]["name"] = "other"
    _expect(data, "components.ffn_infer[1].states", "other", wiring=True, files=False)


def test_layout_rejects_bad_dimensions():
    with pytest.raises(ConfigError, match="split_lm_head"):
        qwen_like(vocab_size=250, split_lm_head=16)
    with pytest.raises(ConfigError, match="num_chunks"):
        qwen_like(num_layers=5, num_chunks=2)
    with pytest.raises(ConfigError, match="hidden_size"):
        qwen_like(hidden_size=0)


def test_component_config_round_trip():
    comp = ComponentConfig(
        file_path="a.mlpackage",
        inputs={"x": TensorSpec("x", (1, 2), "FLOAT16", ((1, 2), (1, 1)))},
        outputs={"y": TensorSpec("y", (1,), "INT32")},
        functions=["f"],
        function="f",
    )
    assert ComponentConfig.from_dict(comp.to_dict(), "c") == comp
