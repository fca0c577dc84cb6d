"""`anemll-fast bench`: the native timing counters and loops, the JSON it writes, --compare, and its refusals.

Tiny models and step counts keep this quick; nothing here asserts a speed (the figures are the benchmark's,
not the tests'): timings are checked only against lower bounds a backend sleeps for, and against each other.
"""
from __future__ import annotations

import copy
import json
import sys
import time

import numpy as np
import pytest

from anemll_fast.bench import BenchError, compare, report, suites
from anemll_fast.cli import main as cli_main
from anemll_fast.config import ModelConfig
from anemll_fast.engine import Engine

tiny = pytest.importorskip("anemll_fast.testing.tiny")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("bench") / "m", context_length=48, batch_size=8,
                                 vocab_size=512).path


# ---------------------------------------------------------------- native side
def test_native_decode_loop_gives_the_tokens_of_generate(model_dir):
    cfg = ModelConfig.from_anemll_dir(model_dir)
    prompt = [5, 17, 300, 42, 7, 99]
    with Engine(cfg, "reference") as eng:
        expected = eng.generate(prompt, 9)
        pre, first, tok = eng._eng.bench_prefill(prompt, 2)
        tokens, ns = eng._eng.bench_decode(tok, len(prompt), 8)
    assert [tok] + [int(t) for t in tokens] == expected
    assert pre.shape == first.shape == (2,) and ns.shape == (8,)
    assert (ns > 0).all() and (first >= pre).all() and (pre > 0).all()


class _SleepingParts:
    """The reference backend whose predictions also sleep a known time per part (embeddings, FFN, LM head)."""

    SLEEP = {"embeddings": 0.001, "FFN": 0.003, "lm_head": 0.006}

    def __init__(self):
        from anemll_fast.backends import reference

        self.reference = reference

    def load(self, path, function_name=None):
        model = self.reference.load(path, function_name)
        kind = "embeddings" if "embeddings" in path else ("lm_head" if "lm_head" in path else "FFN")
        return _Sleeping(model, self.SLEEP[kind])


class _Sleeping:
    def __init__(self, model, seconds):
        self.model, self.seconds = model, seconds

    def make_state(self):
        return self.model.make_state()

    def predict(self, inputs, state=None):
        time.sleep(self.seconds)
        return self.model.predict(inputs, state)


def test_timing_counters_attribute_each_part(model_dir):
    cfg = ModelConfig.from_anemll_dir(model_dir)
    with Engine(cfg, _SleepingParts(), sampling=None) as eng:
        native = eng._eng
        native.prefill([1, 2, 3])
        assert native.timing_counters()["steps"] == 0  # off by default: nothing counted
        native.step(4, 3)
        assert native.timing_counters()["total"] == 0
        native.set_timing(True)
        native.reset_timing()
        steps = 4
        _, ns = native.bench_decode(4, 3, steps)
        c = native.timing_counters()
    assert c["steps"] == steps and len(c["chunks"]) == 1
    sleep = _SleepingParts.SLEEP
    # Each part holds at least what its prediction slept: a part timed as another, or not timed, fails here.
    assert c["embeddings"] >= steps * sleep["embeddings"]
    assert c["chunks"][0] >= steps * sleep["FFN"]
    assert c["lm_head"] >= steps * sleep["lm_head"]
    assert c["sampler"] > 0 and c["host"] > 0
    parts = c["embeddings"] + sum(c["chunks"]) + c["lm_head"] + c["sampler"] + c["host"]
    assert parts == pytest.approx(c["total"])
    # The counters' steps lie inside the loop's own per-step timing, and fill nearly all of it.
    loop = ns.sum() / 1e9
    assert 0.9 * loop <= c["total"] <= loop


def test_sampler_and_floor_loops():
    from anemll_fast import _native

    parts = [np.random.default_rng(i).normal(size=1000).astype(np.float16) for i in range(4)]
    s = _native.NativeSampler(4000, {"temperature": 0.7, "top_k": 40, "seed": 1})
    ns = s.bench(parts, [1, 2, 3], 5)
    assert ns.shape == (5,) and (ns > 0).all()
    assert (_native.bench_read_floor(parts, 3) > 0).all()
    with pytest.raises(ValueError, match="cover the vocabulary"):
        s.bench(parts[:2], [], 2)


# ---------------------------------------------------------------- the suite and its JSON
def _check_schema(doc):
    report.validate(doc)
    assert doc["schema"] == report.SCHEMA and doc["schema_version"] == report.SCHEMA_VERSION
    for key in ("os", "arch", "cpu", "cpu_count", "python", "versions"):
        assert key in doc["machine"]
    assert doc["machine"]["versions"]["anemll_fast"]
    assert doc["settings"]["suite"]
    for f in doc["figures"]:
        assert f["min"] <= f["median"] <= f["max"] and f["n"] == len(f["samples"]) >= 1
        assert f["better"] in ("higher", "lower")


@pytest.fixture(scope="module")
def e2e_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    rc = cli_main(["bench", str(model_dir), "--only", "e2e", "--backend", "reference", "--quiet",
                   "--json", str(out / "r.json"), "--plot", str(out / "plots")])
    assert rc == 0
    return out, json.loads((out / "r.json").read_text())


def test_end_to_end_json_and_plots(e2e_run):
    out, doc = e2e_run
    _check_schema(doc)
    ids = {f["id"] for f in doc["figures"]}
    for wanted in ("e2e/reference/prefill/16", "e2e/reference/ttft/16", "e2e/reference/decode/16",
                   "e2e/reference/peak_rss", "vs_chatpy/reference/ratio", "breakdown/reference/host",
                   "breakdown/reference/FFN chunk 1", "breakdown/reference/sampler"):
        assert wanted in ids
    breakdown = [f for f in doc["figures"] if f["id"].startswith("breakdown/reference/")]
    assert all(f["median"] > 0 for f in breakdown)
    assert not any("other greedy tokens" in n for n in doc["notes"])  # both loops agree on the tokens
    assert {p.name for p in (out / "plots").iterdir()} >= {"tokens_per_s.png", "breakdown.png", "vs_chatpy.png"}


def test_host_and_sampler_parts(tmp_path):
    import dataclasses

    suite = dataclasses.replace(suites.SUITES["quick"], host_steps=12, host_chains=("greedy", "top-p 0.9"),
                                sampler_reps=3, sampler_chains=("greedy", "full chain"), layouts=("Gemma-3-1B",),
                                vocabs=(151936,))
    res = suites.Results()
    suites.samplers(suite, res, lambda m: None)
    suites.host_overhead(suite, res, lambda m: None)
    doc = report.document(res.figures, {"suite": "test"}, res.notes)
    _check_schema(json.loads(json.dumps(doc)))
    ids = {f.id for f in res.figures}
    assert ids >= {"sampler/151936/floor", "sampler/151936/greedy", "sampler/151936/full chain",
                   "host/Gemma-3-1B/greedy", "host/Gemma-3-1B/top-p 0.9", "host/Gemma-3-1B/floor",
                   "host/Gemma-3-1B/timing_cost"}
    from anemll_fast.bench.plots import write_plots

    names = {p.name for p in write_plots(doc, str(tmp_path))}
    assert names == {"samplers.png", "host_overhead.png"}


def test_validate_refuses_a_figure_without_max(e2e_run):
    doc = copy.deepcopy(e2e_run[1])
    del doc["figures"][0]["max"]
    with pytest.raises(BenchError, match="'max' missing"):
        report.validate(doc)
    doc = copy.deepcopy(e2e_run[1])
    doc["figures"][0]["min"] = doc["figures"][0]["max"] + 1
    with pytest.raises(BenchError, match="min <= median <= max"):
        report.validate(doc)


# ---------------------------------------------------------------- --compare
def _fig(id_, median, better, noisy=False):
    return {"id": id_, "label": id_, "median": median, "better": better, "noisy": noisy}


def test_compare_ratios_and_regressions():
    old = {"figures": [_fig("a", 100.0, "higher"), _fig("b", 10.0, "lower"), _fig("c", 50.0, "higher"),
                       _fig("d", 4.0, "lower", noisy=True), _fig("gone", 1.0, "lower")]}
    new = {"figures": [_fig("a", 120.0, "higher"), _fig("b", 20.0, "lower"), _fig("c", 40.0, "higher"),
                       _fig("d", 8.0, "lower"), _fig("new", 1.0, "lower")]}
    got = {r.id: r for r in compare.compare(new, old)}
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"].ratio == pytest.approx(1.2) and not got["a"].regression
    assert got["b"].ratio == pytest.approx(0.5) and got["b"].regression  # a time doubled
    assert got["c"].ratio == pytest.approx(0.8) and got["c"].regression  # a rate fell by 20%
    assert got["d"].ratio == pytest.approx(0.5) and got["d"].noisy and not got["d"].regression
    text = compare.summary(list(got.values()))
    assert "2 regression(s) among 4 figures" in text


def test_compare_from_the_command_line(e2e_run, tmp_path, capsys):
    out, doc = e2e_run
    previous = copy.deepcopy(doc)
    target = next(f for f in previous["figures"] if f["id"] == "e2e/reference/decode/16")
    for key in ("min", "median", "max"):
        target[key] *= 2  # the earlier run decoded twice as fast: a regression now
    target["noisy"] = False
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps(previous))
    new = compare.compare(doc, previous)
    r = next(x for x in new if x.id == "e2e/reference/decode/16")
    assert r.ratio == pytest.approx(0.5)
    assert r.regression == (not next(f for f in doc["figures"] if f["id"] == r.id)["noisy"])
    assert cli_main(["bench", "--only", "sampler", "--quiet", "--compare", str(prev)]) == 0
    assert "figures compared" in capsys.readouterr().out


# ---------------------------------------------------------------- refusals
def _refused(capsys, argv, message):
    try:
        rc = cli_main(["bench"] + argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    return err


def test_refuses_unknown_backend_and_suite(capsys):
    _refused(capsys, ["--backend", "tpu"], "invalid choice: 'tpu'")
    _refused(capsys, ["--suite", "huge"], "invalid choice: 'huge'")
    _refused(capsys, ["--only", "e2e,gpu"], "unknown part 'gpu'")


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML is available on macOS")
def test_refuses_an_unavailable_backend(capsys):
    _refused(capsys, ["--only", "e2e", "--backend", "coreml"], "'coreml' is not available here")


def test_refuses_missing_model(capsys, tmp_path):
    _refused(capsys, [str(tmp_path / "nope")], "no such model directory")
    _refused(capsys, [str(tmp_path)], "no meta.yaml there")


def test_refuses_bad_compare_file(capsys, tmp_path):
    _refused(capsys, ["--compare", str(tmp_path / "missing.json")], "cannot read it")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _refused(capsys, ["--compare", str(bad)], "not JSON")
    bad.write_text(json.dumps({"schema": "other"}))
    _refused(capsys, ["--compare", str(bad)], "not an anemll-fast bench result")
    bad.write_text(json.dumps({"schema": report.SCHEMA, "schema_version": report.SCHEMA_VERSION, "machine": {},
                               "settings": {}, "figures": [{"id": "x"}]}))
    _refused(capsys, ["--compare", str(bad)], "figures[0] (x)")


def test_refuses_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    _refused(capsys, ["--only", "sampler", "--plot", str(tmp_path)], "anemll_fast[bench]")


def test_neural_engine_share_from_the_compute_plan():
    from anemll_fast.compute_plan import ComputePlan, ComputePlanUnavailable, FunctionPlacement

    class Planned:
        def __init__(self, plan):
            self.plan = plan

        def compute_plan(self):
            if isinstance(self.plan, Exception):
                raise self.plan
            return self.plan

    plan = ComputePlan("cpu_and_ne", [
        FunctionPlacement("embeddings", "e", "main", {}, {"cpu": 1.0}),
        FunctionPlacement("ffn_infer[0]", "f", "infer", {}, {"neural_engine": 6.0, "cpu": 1.0}),
    ])
    res = suites.Results()
    suites._ane_share(Planned(plan), "coreml/cpu_and_ne", res)
    (fig,) = res.figures
    assert fig.id == "e2e/coreml/cpu_and_ne/ane_share" and fig.median == pytest.approx(75.0)
    assert not fig.noisy  # measured once by design
    res = suites.Results()
    suites._ane_share(Planned(ComputePlanUnavailable("needs macOS 14.4")), "coreml/all", res)
    assert not res.figures and "needs macOS 14.4" in res.notes[0]


def test_prompt_lengths_fit_the_context():
    quick, full = suites.SUITES["quick"], suites.SUITES["full"]
    assert suites.prompt_lengths(full, 512, 32) == [16, 64, 256, 448]
    assert suites.prompt_lengths(quick, 48, 12) == [16]
    assert suites.prompt_lengths(quick, 16, 12) == [4]  # nothing fits: one prompt that leaves room to decode


def test_quiet_lasts_for_the_run_only():
    from anemll_fast import progress

    assert not progress.is_quiet()
    assert cli_main(["bench", "--only", "sampler", "--quiet"]) == 0
    assert not progress.is_quiet()  # later progress displays of the process are not silenced


# ---------------------------------------------------------------- against the baselines (issue #18's ratios)
class _LoopBaseline:
    """A baseline side for the tests (torch and llama.cpp are not installed in CI): the chat.py-style loop on
    the same tiny model, a real greedy implementation of its own, so its tokens must equal the engine's. Each
    decode token also spins DECODE_CPU seconds of thread CPU time: a lower bound its decode figure must show."""

    DECODE_CPU = 0.02

    def __init__(self, model_dir):
        from anemll_fast.bench.chatpy_loop import ChatPyLoop

        self.loop = ChatPyLoop(ModelConfig.from_anemll_dir(model_dir), "reference")

    def prefill(self, prompt):
        return self.loop.prefill(prompt)

    def decode(self, first, start, n):
        t = time.thread_time()
        while time.thread_time() - t < n * self.DECODE_CPU:
            pass
        return self.loop.decode(first, start, n)


@pytest.fixture
def default_is_tiny(model_dir, monkeypatch):
    """The default model, its GGUF and the baselines replaced by the tiny model and a loop over it; the LUT
    conversion counted (the tests' 'LUT' model is the tiny one again)."""
    from anemll_fast import default_model
    from anemll_fast.bench import baselines

    lut_calls = []
    monkeypatch.setattr(default_model, "default_model_dir", lambda *a, **k: model_dir)
    monkeypatch.setattr(default_model, "gguf_path", lambda: model_dir / "no.gguf")
    monkeypatch.setattr(default_model, "lut_model_dir", lambda *a, **k: lut_calls.append(1) or model_dir)
    monkeypatch.setattr(baselines, "available", lambda gguf: {"torch fp32": _LoopBaseline(model_dir)})
    return lut_calls


def _baseline_suite(**kw):
    import dataclasses

    return dataclasses.replace(suites.SUITES["quick"], decode_steps=4, chat_rounds=3, warmup=0, **kw)


def _by_id(res):
    return {f.id: f for f in res.figures}


def test_rss_children_load_the_whole_model_or_the_parts_alone(model_dir, monkeypatch):
    """The "parts" figure is the reference backend's own (no tokenizer, no engine); "model" is a user's load."""
    import subprocess

    from anemll_fast.bench import versus

    loaded = {}
    real_run = subprocess.run

    def run(cmd, **kw):  # the child as given, then asked which of the two it loaded
        code = cmd[2] + "\nprint(int('anemll_fast.tokenizer' in sys.modules), int('anemll_fast.engine' in sys.modules))"
        out = real_run(cmd[:2] + [code] + cmd[3:], **kw)
        loaded[len(loaded)] = out.stdout.split()[-2:]
        return real_run(cmd, **kw)

    monkeypatch.setattr(versus.subprocess, "run", run)
    assert versus.rss_after_load_mb(model_dir, "model") > 0 and versus.rss_after_load_mb(model_dir, "parts") > 0
    assert loaded == {0: ["1", "1"], 1: ["0", "0"]}
    with pytest.raises(ValueError, match="what"):
        versus.rss_after_load_mb(model_dir, "everything")


def test_against_baselines_ratios_per_round(default_is_tiny, tmp_path):
    from anemll_fast.bench import versus

    res = suites.Results()
    versus.against_baselines(_baseline_suite(), res, lambda m: None)
    assert default_is_tiny == []  # the quick suite converts nothing
    f = _by_id(res)
    ours, torch = "baselines/anemll_fast reference fp16", "baselines/torch fp32"
    for side in (ours, torch):
        assert len(f[f"{side}/prefill"].samples) == len(f[f"{side}/decode"].samples) == 3
        assert f[f"{side}/prefill"].params["prompt"] == 48 - 4 - 1  # 64 does not fit the tiny context
    # The baseline's decode spun its known CPU time per token (its prefill did not): a prefill rate taken for
    # the decode rate would exceed the bound.
    assert f[f"{torch}/decode"].max <= 1 / _LoopBaseline.DECODE_CPU
    # Each ratio is ours over the baseline's, round by round, decode with decode and prefill with prefill.
    dec, pre = f["baselines/fp16/decode_vs/torch fp32"], f["baselines/fp16/prefill_vs/torch fp32"]
    assert dec.samples == pytest.approx([a / b for a, b in zip(f[f"{ours}/decode"].samples,
                                                                f[f"{torch}/decode"].samples)])
    assert pre.samples == pytest.approx([a / b for a, b in zip(f[f"{ours}/prefill"].samples,
                                                                f[f"{torch}/prefill"].samples)])
    assert dec.unit == pre.unit == "x" and dec.better == "higher"
    rss, files = f["baselines/fp16/rss_after_load"].median, f["baselines/fp16/files"].median
    assert rss > files > 0 and f["baselines/fp16/rss_per_files"].median == pytest.approx(rss / files)
    assert f["baselines/fp16/rss_parts_per_files"].median > 0
    assert "fp16 vs torch fp32: greedy tokens equal, all 5" in res.notes
    assert any("LUT4/LUT6 conversion not measured" in n for n in res.notes)
    assert not any("lut" in i for i in f)
    doc = report.document(res.figures, {"suite": "test"}, res.notes)
    _check_schema(json.loads(json.dumps(doc)))
    assert "fp16: decode, anemll_fast / torch fp32" in report.table(doc)
    from anemll_fast.bench.plots import write_plots

    assert {p.name for p in write_plots(doc, str(tmp_path))} == {"vs_baselines.png"}


class _OffByOneBaseline(_LoopBaseline):
    """Right first token, every decoded one wrong."""

    DECODE_CPU = 0.0

    def decode(self, first, start, n):
        return [t + 1 for t in super().decode(first, start, n)]


def test_against_baselines_with_the_lut_conversion(default_is_tiny, model_dir, monkeypatch):
    from anemll_fast.bench import baselines, versus

    monkeypatch.setattr(baselines, "available", lambda gguf: {"llama.cpp": _OffByOneBaseline(model_dir)})

    res = suites.Results()
    versus.against_baselines(_baseline_suite(lut_baseline=True), res, lambda m: None, rss=False)
    assert default_is_tiny == [1]
    ids = {f.id for f in res.figures}
    assert {"baselines/lut4/6/decode_vs/llama.cpp", "baselines/lut4/6/prefill_vs/llama.cpp",
            "baselines/fp16/decode_vs/llama.cpp", "baselines/anemll_fast reference lut4/6/decode"} <= ids
    assert not any("not measured" in n for n in res.notes)
    assert "lut4/6 vs llama.cpp: greedy tokens equal for the first 1 of 5" in res.notes


def test_against_baselines_without_any_baseline(monkeypatch):
    from anemll_fast import default_model
    from anemll_fast.bench import baselines, versus

    monkeypatch.setattr(default_model, "gguf_path", lambda: "no.gguf")
    monkeypatch.setattr(baselines, "available", lambda gguf: {})
    res = suites.Results()
    versus.against_baselines(_baseline_suite(), res, lambda m: None)
    assert res.figures == [] and "none measured" in res.notes[0]


def test_lut_option_turns_the_conversion_on(default_is_tiny, monkeypatch):
    from anemll_fast.bench import cli, versus

    seen = []
    monkeypatch.setattr(versus, "against_baselines", lambda suite, res, progress: seen.append(suite.lut_baseline))
    monkeypatch.setattr(suites, "end_to_end", lambda *a: None)
    assert cli_main(["bench", "--only", "e2e", "--backend", "reference", "--quiet", "--lut"]) == 0
    assert cli_main(["bench", "--only", "e2e", "--backend", "reference", "--quiet"]) == 0
    assert seen == [True, False]
