"""ANEMLL 0.3.5 models end to end on the reference backend: Gemma 3 (sliding window, two states, rotate
functions), monolithic models of every architecture, and states shared by name."""
import shutil

import numpy as np
import pytest

from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine
from anemll_fast.errors import ConfigError
from anemll_fast.testing.tiny import build_tiny_model

STEPS = 32
CTX, WINDOW, BATCH = 56, 8, 4


def greedy_both(model, prompt, n=STEPS):
    cfg = ModelConfig.from_anemll_dir(model.path)
    eng = Engine(cfg, "reference")
    return eng, eng.generate(prompt, n), model.reference().greedy(prompt, n)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    # Four layers in two chunks: chunk 1 holds sliding layers only, yet declares (and shares) the global state.
    return build_tiny_model(tmp_path_factory.mktemp("g") / "gemma", "gemma3", num_chunks=2, num_layers=4,
                            context_length=CTX, batch_size=BATCH, sliding_window=WINDOW, tied=False,
                            rope_theta=1e6, rope_local_theta=1e4, query_pre_attn_scalar=24.0,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"])


@pytest.mark.slow
def test_gemma3_past_the_window_equals_the_reference(gemma):
    prompt = [5, 77, 300, 12, 9, 411, 23, 8, 99, 140, 7, 61, 250]  # 13 tokens: past the window of 8 already
    eng, out, ref = greedy_both(gemma, prompt)
    assert out == ref and len(out) == STEPS
    # Two states of different shapes, one backend state shared by every chunk and function.
    states = eng.config.states()
    assert {n: list(s.shape) for n, (s, _) in states.items()} == {
        "model_model_kv_cache_local": [2 * 3, 2, WINDOW, 16], "model_model_kv_cache_global": [2 * 1, 2, CTX, 16]}
    assert all(len(labels) == 8 for _, labels in states.values())  # 2 chunks x 4 functions
    assert eng.state_count == 1
    # Every position exactly once: prompt positions 0..7 by two prefill batches (they fit the window), 8..11
    # and every decode step by infer_rotate; none by infer.
    assert eng.counters["prefill"] == 2 * 2
    assert eng.counters["infer"] == 0
    last = len(prompt) + STEPS - 2  # the last token fed; the final sampled one is not
    assert eng.schedule_counters == {"infer_rotate": 2 * (last - WINDOW + 1), "cache_rebuilds": 0, "context_switches": 0}
    assert eng.function_at(WINDOW - 1) == ("infer", False, CTX)
    assert eng.function_at(WINDOW - BATCH) == ("infer", True, CTX)
    assert eng.function_at(WINDOW) == ("infer_rotate", False, CTX)


@pytest.mark.slow
def test_gemma3_short_prompt_and_rewind_of_a_rotated_cache(gemma):
    cfg = ModelConfig.from_anemll_dir(gemma.path)
    eng = Engine(cfg, "reference")
    ref = gemma.reference()
    prompt = [3, 1, 4]
    out = eng.generate(prompt, 20)
    assert out == ref.greedy(prompt, 20)
    # A second prompt sharing the first 6 positions: the cache (rotated past the window) is rebuilt from history.
    second = (prompt + out)[:6] + [42, 43, 44]
    assert eng.cached_prefix(second) == 6
    assert eng.generate(second, 12) == ref.greedy(second, 12)
    assert eng.schedule_counters["cache_rebuilds"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {"argmax_head": True}), ("qwen3", {}),
                                     ("gemma3", {"tied": False, "sliding_window": WINDOW})])
def test_monolithic_equals_the_reference(tmp_path, arch, kw):
    model = build_tiny_model(tmp_path / arch, arch, monolithic=True, context_length=48, batch_size=BATCH, **kw)
    files = sorted(p.name for p in model.path.iterdir() if p.suffix == ".mlpackage")
    prefix = {"llama": "llama", "gemma3": "gemma3"}.get(arch, "qwen")
    assert files == [f"{prefix}_monolithic_full.mlpackage"]
    meta = (model.path / "meta.yaml").read_text()
    assert "model_type: monolithic" in meta and f"monolithic_model: {prefix}_monolithic_full.mlmodelc" in meta
    prompt = [11, 200, 3, 57, 9, 140, 33]
    eng, out, ref = greedy_both(model, prompt)
    assert out == ref and len(out) == STEPS
    assert eng.config.monolithic and eng.config.embeddings is None and eng.config.lm_head is None
    assert eng.counters["embed"] == 0 and eng.counters["head"] == 0  # all inside the one file
    assert eng.counters["prefill"] == 2  # positions 0..3, then 4..5 in a padded batch
    assert eng.config.argmax_in_model == bool(kw.get("argmax_head"))


# ------------------------------------------------------------------------------------------------ bad input

def _edit_meta(model_dir, old, new):
    meta = model_dir / "meta.yaml"
    text = meta.read_text()
    assert old in text
    meta.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def llama_copyable(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("l") / "llama", "llama", context_length=32, batch_size=4)


def test_meta_yaml_naming_a_function_the_file_lacks(llama_copyable, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_copyable.path, d)
    _edit_meta(d, "      - prefill\n", "      - prefill\n      - infer_rotate\n")
    with pytest.raises(ConfigError, match=r"FFN_PF_chunk_01of01.*lists function\(s\) \['infer_rotate'\]"):
        ModelConfig.from_anemll_dir(d)


def test_rotate_function_missing_where_the_window_requires_it(llama_copyable, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_copyable.path, d)
    _edit_meta(d, "    prefill_dynamic_slice: true\n", "    prefill_dynamic_slice: true\n    sliding_window: 8\n")
    with pytest.raises(ConfigError, match=r"ffn_infer_rotate: missing.*sliding window \(8\).*'infer_rotate' of "
                                          r"llama_FFN_PF_chunk_01of01"):
        ModelConfig.from_anemll_dir(d)
    # A window as long as the context never rotates: no rotate function needed.
    _edit_meta(d, "sliding_window: 8", "sliding_window: 32")
    assert ModelConfig.from_anemll_dir(d).sliding_window is None


def _null_config(states_of):
    """A two-chunk config for the null backend; states_of(role, chunk) gives each function's states."""
    H, V, ctx, B = 16, 64, 32, 4

    def t(shape, dtype="FLOAT16"):
        return {"shape": shape, "data_type": dtype}

    def ffn(S, fn, c):
        return {"file_path": f"chunk{c}.null", "function": fn, "functions": ["infer", "prefill"],
                "inputs": {"hidden_states": t([1, S, H]), "position_ids": t([S], "INT32"),
                           "causal_mask": t([1, 1, S, ctx]), "current_pos": t([1], "INT32")},
                "outputs": {"output_hidden_states": t([1, S, H])},
                "states": {n: t(shape) for n, shape in states_of(fn, c).items()}}

    return ModelConfig.from_dict({
        "shapes": {"batch_size": B, "context_length": ctx, "hidden_size": H, "vocab_size": V},
        "components": {
            "embeddings": {"file_path": "emb.null",
                           "inputs": {"input_ids": {**t([1, 1], "INT32"), "enumerated_shapes": [[1, B]]}},
                           "outputs": {"hidden_states": t([1, 1, H])}},
            "ffn_prefill": [ffn(B, "prefill", c) for c in range(2)],
            "ffn_infer": [ffn(1, "infer", c) for c in range(2)],
            "lm_head": {"file_path": "head.null", "inputs": {"hidden_states": t([1, 1, H])},
                        "outputs": {"logits1": t([1, 1, V])}},
        },
    })


def test_states_shared_by_name_one_backend_state_per_set():
    shared = _null_config(lambda fn, c: {"local": [2, 1, 8, 4], "global": [2, 1, 32, 4]})
    assert Engine(shared, "null").state_count == 1
    per_chunk = _null_config(lambda fn, c: {f"kv_{c}": [2, 1, 32, 4], f"aux_{c}": [1, 4]})
    per_chunk.validate_wiring()
    assert Engine(per_chunk, "null").state_count == 2
    stateless = _null_config(lambda fn, c: {})
    assert Engine(stateless, "null").state_count == 0


def test_state_spec_differing_between_chunks_is_named():
    cfg = _null_config(lambda fn, c: {"local": [2, 1, 8 if (fn, c) != ("prefill", 1) else 16, 4]})
    with pytest.raises(ConfigError, match=r"components.ffn_prefill\[1\].states.local.shape: \[2, 1, 16, 4\] "
                                          r"\(chunk1.null, function prefill\) differs from \[2, 1, 8, 4\]"):
        cfg.validate_wiring()
    with pytest.raises(ConfigError, match=r"components.ffn_prefill\[1\].states.local: FLOAT16 \[2, 1, 16, 4\] in "
                                          r"components.ffn_prefill\[1\] \(chunk1.null, function prefill\) differs"):
        Engine(cfg, "null")


def test_state_shared_without_the_same_set_is_named():
    cfg = _null_config(lambda fn, c: {"kv": [2, 1, 32, 4], **({"extra": [4]} if c == 1 else {})})
    with pytest.raises(ConfigError, match=r"ffn_prefill\[1\].states: names \['extra', 'kv'\] differ .* share \['kv'\]"):
        cfg.validate_wiring()
    with pytest.raises(ConfigError, match=r"declares \{extra, kv\} but .* declares \{kv\}; state kv is shared"):
        Engine(cfg, "null")


@pytest.mark.slow
def test_inspect_shows_states_per_part_and_the_schedule(gemma, capsys):
    import argparse

    from anemll_fast import inspect

    inspect.run(argparse.Namespace(model=str(gemma.path), json=False, compute_plan=False))
    text = capsys.readouterr().out
    assert "state      model_model_kv_cache_local: FLOAT16 [6, 2, 8, 16]  in ffn_prefill[0], ffn_prefill[1]" in text
    assert "state      model_model_kv_cache_global: FLOAT16 [2, 2, 56, 16]" in text
    assert "positions < 8: infer; >= 8: infer_rotate" in text
    assert "prefill batches of 4 while a batch fits below position 8" in text


class _ArgmaxBackend:
    """A Python backend whose head reports a fixed per-part argmax (indices within each part)."""

    def __init__(self, idx, val):
        self.idx, self.val = np.array(idx, np.int32), np.array(val, np.float16)

    def load(self, path, function_name=None):
        backend = self

        class Model:
            def make_state(self):
                return object()

            def predict(self, inputs, state=None):
                if path == "head.null":
                    return {"argmax_idx": backend.idx, "argmax_val": backend.val}
                h = inputs.get("hidden_states")
                if h is None:
                    return {"hidden_states": np.zeros((1, inputs["input_ids"].shape[1], 16), np.float16)}
                return {"output_hidden_states": np.zeros_like(h)}

        return Model()


@pytest.mark.parametrize("idx,val,token", [([3, 0, 11, 2], [0.5, 0.1, 2.0, 1.0], 26 + 11),
                                           ([12, 0, 0, 0], [9.0, 0.1, 0.2, 0.3], 12),
                                           ([0, 0, 0, 11], [0.0, 0.1, 0.2, 0.3], 38 + 11)])
def test_argmax_head_local_indices_and_uneven_parts(idx, val, token):
    # vocab 50 in 4 parts without lm_head_chunk_sizes: 13, 13, 12, 12 as ANEMLL 0.3.5's chat.py splits it.
    cfg = _null_config(lambda fn, c: {})
    d = cfg.to_dict()
    d["shapes"]["vocab_size"] = 50
    d["components"]["lm_head"]["outputs"] = {"argmax_idx": {"shape": [4], "data_type": "INT32"},
                                             "argmax_val": {"shape": [4], "data_type": "FLOAT16"}}
    eng = Engine(ModelConfig.from_dict(d), _ArgmaxBackend(idx, val))
    assert eng.generate([1, 2], 1) == [token]


def test_argmax_index_outside_its_part_is_named():
    cfg = _null_config(lambda fn, c: {})
    d = cfg.to_dict()
    d["shapes"]["vocab_size"] = 50
    d["components"]["lm_head"]["outputs"] = {"argmax_idx": {"shape": [4], "data_type": "INT32"},
                                             "argmax_val": {"shape": [4], "data_type": "FLOAT16"}}
    eng = Engine(ModelConfig.from_dict(d), _ArgmaxBackend([0, 0, 12, 0], [0, 0, 1, 0]))  # part 2 holds 12
    with pytest.raises(Exception, match=r"lm_head: argmax_idx\[2\] = 12 is outside part 2 \(size 12\)"):
        eng.generate([1, 2], 1)


def test_cli_converts_monolithic_gemma3_with_argmax(tmp_path, capsys):
    import json

    from anemll_fast.cli import main

    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({
        "model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": False}))
    out = tmp_path / "m"
    rc = main(["convert", "--random", str(spec), str(out), "--context", "16", "--batch", "4", "--monolithic",
               "--argmax", "--split-lm-head", "2", "--quiet"])
    assert rc == 0
    meta = (out / "meta.yaml").read_text()
    for line in ("model_type: monolithic", "monolithic_model: gemma3_monolithic_full.mlmodelc", "sliding_window: 16",
                 "argmax_in_model: true", "    functions:\n      - infer\n      - prefill\n"):
        assert line in meta
    cfg = ModelConfig.from_anemll_dir(out)
    # A window as long as the context never rotates: ANEMLL converts no rotate functions then.
    assert cfg.monolithic and cfg.argmax_in_model and cfg.sliding_window is None and not cfg.ffn_infer_rotate
    capsys.readouterr()
    assert main(["convert", "--random", str(spec), str(tmp_path / "x"), "--context", "16", "--batch", "4",
                 "--monolithic", "--chunks", "2", "--quiet"]) != 0
    assert "num_chunks 2: a monolithic model is one file" in capsys.readouterr().err


def test_hub_detects_partial_unzipped_mlmodelc(llama_copyable, tmp_path):
    from anemll_fast.errors import HubError
    from anemll_fast.hub import resolve
    from anemll_fast.mil.loader import load_program
    from anemll_fast.mil.text_writer import write_mlmodelc

    d = tmp_path / "repo"
    d.mkdir()
    shutil.copy(llama_copyable.path / "meta.yaml", d)
    for pkg in llama_copyable.path.glob("*.mlpackage"):
        write_mlmodelc(load_program(str(pkg)), str(d / pkg.name.replace(".mlpackage", ".mlmodelc")))
    assert resolve(d) == d.resolve()  # complete: accepted, and the model loads from the compiled parts
    assert ModelConfig.from_anemll_dir(d).ffn_infer[0].file_path.endswith(".mlmodelc")
    weights = d / "llama_FFN_PF_chunk_01of01.mlmodelc" / "weights" / "weight.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])  # the download stopped 100 bytes short
    with pytest.raises(HubError, match=r"FFN_PF_chunk_01of01.mlmodelc: incomplete or corrupt weight file "
                                       r"weights/weight.bin: .*outside the file"):
        resolve(d)
    weights.unlink()
    with pytest.raises(HubError, match="weight file weights/weight.bin missing"):
        resolve(d)
    weights.write_bytes(data)
    (d / "llama_lm_head.mlmodelc" / "model.mil").unlink()
    with pytest.raises(HubError, match="llama_lm_head.mlmodelc: incomplete compiled model, model.mil missing"):
        resolve(d)


@pytest.fixture(scope="module")
def switching(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("c") / "ctx", "qwen3", contexts=[16, 48], batch_size=BATCH)


@pytest.mark.slow
def test_context_switching_equals_the_reference(switching):
    meta = (switching.path / "meta.yaml").read_text()
    assert "state_transition_infer_contexts: [16, 48]" in meta and "      - prefill_ctx16\n" in meta
    cfg = ModelConfig.from_anemll_dir(switching.path)
    assert cfg.shapes.context_length == 48 and list(cfg.context_functions) == [16]
    assert cfg.ffn_infer[0].function == "infer_ctx48"
    assert cfg.context_functions[16]["ffn_prefill"][0].function == "prefill_ctx16"
    assert ModelConfig.from_dict(cfg.to_dict(), model_dir=cfg.model_dir) == cfg
    eng = Engine(cfg, "reference")
    assert eng.active_context == 16 and eng.state_count == 2  # one state per size
    prompt = [5, 77, 300, 12, 9, 411, 23, 8, 99, 140, 7]
    assert eng.function_at(15)[2] == 16 and eng.function_at(16)[2] == 48
    out = eng.generate(prompt, STEPS)
    assert out == switching.reference().greedy(prompt, STEPS)
    assert eng.active_context == 48 and eng.schedule_counters["context_switches"] == 1
    # A new prompt sharing 5 positions moves the cache back to the smallest size, and stays exact.
    second = prompt[:5] + [1, 2, 3]
    assert eng.generate(second, 6) == switching.reference().greedy(second, 6)
    assert eng.active_context == 16 and eng.schedule_counters["context_switches"] == 2
    eng.reset()
    assert eng.active_context == 16


@pytest.mark.slow
def test_inspect_shows_context_switching(switching, capsys):
    import argparse

    from anemll_fast import inspect

    inspect.run(argparse.Namespace(model=str(switching.path), json=False, compute_plan=False))
    assert ("context switching: infer_ctx16 below position 16, then infer_ctx48 below position 48"
            in capsys.readouterr().out)


def test_context_switching_needs_a_backend_that_copies_states(switching):
    class NoCopy:  # states without copy_from
        def load(self, path, function_name=None):
            from anemll_fast.backends import reference

            model = reference.load(path, function_name)

            class Wrapped:
                def make_state(self):
                    return [model.make_state()]

                def predict(self, inputs, state=None):
                    return model.predict(inputs, state[0] if state else None)

            return Wrapped()

    eng = Engine(ModelConfig.from_anemll_dir(switching.path), NoCopy())
    with pytest.raises(Exception, match=r"context switch 16 -> 48: copy_state failed: .*no copy_from"):
        eng.generate(list(range(20)), 2)
