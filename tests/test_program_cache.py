"""The on-disk cache of loaded programs (anemll_fast.program_cache) and `anemll-fast cache`."""
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import anemll_fast
from anemll_fast import program_cache
from anemll_fast.backends.reference import ReferenceBackend
from anemll_fast.cli import main as cli_main
from anemll_fast.testing.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "programs"
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE", str(folder))
    forget()
    yield folder
    forget()


def forget():
    """This process's memos, as a new process starts."""
    program_cache._structures.clear()
    program_cache._parsed.clear()
    program_cache._hashes.clear()
    program_cache._loaded.clear()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("pc") / "m", arch="llama", num_chunks=1,
                            context_length=32, batch_size=8, seed=5)


def chunk(tiny):
    return str(next(tiny.path.glob("*FFN*chunk_01of01.mlpackage")))


@pytest.fixture
def parses(monkeypatch):
    calls = []
    real = program_cache._parse

    def counting(path, read_weights=True):
        calls.append(os.path.basename(path))
        return real(path, read_weights)

    monkeypatch.setattr(program_cache, "_parse", counting)
    return calls


def run(model, fn="infer", pos=3):
    m = model.function(fn)
    h = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float16)
    inputs = {"hidden_states": h, "position_ids": np.array([pos], np.int32),
              "causal_mask": np.zeros((1, 1, 1, 32), np.float16), "current_pos": np.array([pos], np.int32)}
    state = m.make_state()
    return m.predict(inputs, state)["output_hidden_states"]


def entries(folder):
    return sorted(folder.glob("*.pkl"))


def test_second_load_is_a_hit_and_computes_the_same(cache, tiny, parses):
    first = run(ReferenceBackend.load(chunk(tiny)))
    assert parses == [os.path.basename(chunk(tiny))] and len(entries(cache)) == 1
    forget()
    again = run(ReferenceBackend.load(chunk(tiny)))
    assert parses == [os.path.basename(chunk(tiny))]  # read from the entry, not parsed again
    np.testing.assert_array_equal(first, again)


def _over_a_map(a):
    """True when `a` views a memory-mapped file (through its chain of bases)."""
    while isinstance(a, np.ndarray):
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def test_second_load_maps_the_decoded_weights(cache, tiny, monkeypatch, caplog):
    path = chunk(tiny)
    first = run(ReferenceBackend.load(path))
    forget()
    with monkeypatch.context() as m:
        m.setattr(program_cache, "_read_weights", lambda *a: pytest.fail("weights read again"))
        model = ReferenceBackend.load(path)
        np.testing.assert_array_equal(run(model), first)
    mapped = [v.data for v in program_cache._blob_values_of(model.program)]
    assert mapped and all(_over_a_map(a) for a in mapped)
    # plain arrays over the map: results computed from a np.memmap would be np.memmap too (slow)
    assert not any(isinstance(a, np.memmap) for a in mapped)
    assert not any(a.flags.writeable for a in mapped)
    # A damaged weights file (wrong size, or another entry's) is ignored and rebuilt.
    (weights,) = cache.glob("*.weights")
    for damage in (lambda b: b[:-64], lambda b: b"ANEMLL_FAST_WEIGHTS\n" + b"0" * 64 + b[84:]):
        del model, mapped
        forget()
        weights.write_bytes(damage(weights.read_bytes()))
        model = ReferenceBackend.load(path)
        np.testing.assert_array_equal(run(model), first)
        assert "damaged program cache weights file" in caplog.text
        caplog.clear()
        mapped = None
    forget()
    np.testing.assert_array_equal(run(ReferenceBackend.load(path)), first)
    assert "damaged" not in caplog.text  # rebuilt whole


def test_a_load_parses_and_reads_each_file_once(cache, tiny, parses, monkeypatch):
    reads = []
    real = program_cache._read_weights
    monkeypatch.setattr(program_cache, "_read_weights", lambda groups, label="": (reads.append(len(groups)), real(groups, label)))
    with anemll_fast.load(tiny.path, backend="reference") as model:
        parts = sorted(p.name for p in tiny.path.glob("*.mlpackage"))
        assert sorted(parses) == parts  # the config reader and the backend share one parse per file
        assert len(reads) == len(parts)  # prefill and infer of the chunk share its weights
        assert anemll_fast.generate(model, [1, 2, 3], max_tokens=3) is not None


def test_changed_file_misses(cache, tiny, parses, tmp_path):
    import shutil

    copy = tmp_path / "copy.mlpackage"
    shutil.copytree(chunk(tiny), copy)
    before = run(ReferenceBackend.load(str(copy)))
    forget()
    weights = copy / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    raw = bytearray(weights.read_bytes())
    # Change the first fp16 weight of the last blob, keeping the size (the mtime moves).
    time.sleep(0.01)
    last = raw.rfind(b"\xef\xbe\xad\xde")
    data_off = int.from_bytes(raw[last + 16:last + 24], "little")
    raw[data_off:data_off + 2] = np.float16(7.0).tobytes()
    weights.write_bytes(bytes(raw))
    after = run(ReferenceBackend.load(str(copy)))
    assert parses == ["copy.mlpackage", "copy.mlpackage"]
    assert len(entries(cache)) == 2
    assert not np.array_equal(before, after)  # the new weight is in use
    # An edit of the spec itself with its size and mtime kept still changes the key (hashed whole).
    spec = copy / "Data" / "com.apple.CoreML" / "model.mlmodel"
    key = program_cache.program_key(str(copy))
    st = spec.stat()
    body = bytearray(spec.read_bytes())
    body[len(body) // 2] ^= 1
    spec.write_bytes(bytes(body))
    os.utime(spec, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert program_cache.program_key(str(copy)) != key


def test_key_follows_size_mtime_and_hash_of_large_files(tmp_path):
    d = tmp_path / "big.mlmodelc"
    (d / "weights").mkdir(parents=True)
    spec, weights = d / "model.mil", d / "weights" / "weight.bin"
    spec.write_bytes(b"x" * 300_000)
    weights.write_bytes(b"w" * 1_000_000)
    keys = {program_cache.program_key(str(d))}

    def edit(f, where, keep_mtime):
        st = f.stat()
        body = bytearray(f.read_bytes())
        body[where] ^= 1
        f.write_bytes(bytes(body))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns if keep_mtime else st.st_mtime_ns + 10**9))
        return program_cache.program_key(str(d))

    keys.add(edit(spec, 150_000, keep_mtime=True))  # the spec is hashed whole
    keys.add(edit(weights, 500_000, keep_mtime=False))  # weights: mtime
    keys.add(edit(weights, 10, keep_mtime=True))  # weights: their first and last 64 KiB
    keys.add(edit(weights, 999_990, keep_mtime=True))
    weights.write_bytes(b"w" * 1_000_001)
    keys.add(program_cache.program_key(str(d)))  # size
    assert len(keys) == 6


def test_key_holds_the_package_version(cache, tiny, monkeypatch):
    key = program_cache.program_key(chunk(tiny))
    monkeypatch.setattr(anemll_fast, "__version__", "99.0")
    assert program_cache.program_key(chunk(tiny)) != key


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other_key", "foreign_class"])
def test_damaged_entry_is_ignored_and_rebuilt(cache, tiny, parses, damage, caplog):
    path = chunk(tiny)
    expected = run(ReferenceBackend.load(path))
    forget()
    (entry,) = entries(cache)
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"\x00" * 100)
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    elif damage == "other_key":
        program, _ = program_cache._loads(data, program_cache.program_key(path))
        entry.write_bytes(program_cache._dumps(program, "0" * 64))
    else:  # a pickle that would run code when loaded
        entry.write_bytes(program_cache.MAGIC + program_cache.FORMAT.to_bytes(4, "little")
                          + pickle.dumps(os.system))
    np.testing.assert_array_equal(run(ReferenceBackend.load(path)), expected)
    assert len(parses) == 2  # parsed again
    assert "damaged program cache entry" in caplog.text
    forget()
    ReferenceBackend.load(path)
    assert len(parses) == 2  # the rebuilt entry is whole again


def test_unwritable_cache_costs_speed_not_the_load(tmp_path, monkeypatch, tiny, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE", str(blocker / "programs"))
    forget()
    ReferenceBackend.load(chunk(tiny))
    assert "cannot write the program cache" in caplog.text
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE", "off")
    assert program_cache.cache_dir() is None
    forget()
    ReferenceBackend.load(chunk(tiny))


_WRITER = """
import sys, time
from pathlib import Path
from anemll_fast import program_cache
folder, key, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data = program_cache.MAGIC + bytes([int(sys.argv[4])]) * (8 << 20)
for _ in range(n):
    program_cache._write_entry(folder, key, data)
"""

_READER = """
import sys, time
from pathlib import Path
folder, key, deadline = Path(sys.argv[1]), sys.argv[2], time.time() + float(sys.argv[3])
seen = torn = 0
while time.time() < deadline:
    try:
        data = (folder / (key + ".pkl")).read_bytes()
    except FileNotFoundError:
        continue
    seen += 1
    body = data[len(b"ANEMLL_FAST_PROGRAM\\n"):]
    if len(body) != 8 << 20 or body.count(body[:1]) != len(body):
        torn += 1
print(seen, torn)
"""


def test_concurrent_writers_never_show_a_partial_entry(tmp_path):
    key = "k" * 64
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), key, "6", str(i + 1)], env=env)
               for i in range(3)]
    reader = subprocess.run([sys.executable, "-c", _READER, str(tmp_path), key, "4"], env=env,
                            capture_output=True, text=True, timeout=60)
    for w in writers:
        assert w.wait(timeout=60) == 0
    seen, torn = map(int, reader.stdout.split())
    assert seen > 0 and torn == 0
    assert [p.name for p in tmp_path.iterdir()] == [key + ".pkl"]  # no temporary file left behind


@pytest.mark.slow
def test_concurrent_first_loads(cache, tiny):
    """Processes loading one model at once with an empty cache all succeed and leave whole entries."""
    code = ("import sys, anemll_fast; m = anemll_fast.load(sys.argv[1], backend='reference'); "
            "print(anemll_fast.generate(m, [1, 2, 3], max_tokens=4, seed=1) is not None)")
    env = dict(os.environ, PYTHONPATH=str(REPO), ANEMLL_FAST_PROGRAM_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny.path)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["True"] * 3
    parts = len(list(tiny.path.glob("*.mlpackage")))
    assert len(list(cache.glob("*.pkl"))) == parts and len(list(cache.glob("*.weights"))) == parts
    assert len(list(cache.glob("*.fusion"))) == parts
    assert len(list(cache.iterdir())) == 3 * parts  # no temporary file left behind
    for f in cache.iterdir():
        if f.suffix == ".fusion":
            assert json.loads(f.read_text())["magic"] == program_cache.FUSION_MAGIC
            continue
        magic = program_cache.MAGIC if f.suffix == ".pkl" else program_cache.WEIGHTS_MAGIC
        assert f.read_bytes().startswith(magic)


def test_cache_cli_info_and_clear(cache, tiny, capsys):
    ReferenceBackend.load(chunk(tiny))
    assert cli_main(["cache"]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert cli_main(["cache", "clear"]) == 0
    assert "removed 1 " in capsys.readouterr().out
    assert list(cache.iterdir()) == []


# ------------------------------------------------------------ size and pruning
def fake_entry(folder, key, pkl_bytes, weights_bytes, used):
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, n in ((".pkl", pkl_bytes), (".weights", weights_bytes)):
        if n is not None:
            f = folder / f"{key}{suffix}"
            f.write_bytes(b"x" * n)
            os.utime(f, (used, used))


def keys_in(folder):
    return sorted({f.stem for f in folder.iterdir()})


def test_prune_by_total_size_least_recently_used_first(tmp_path):
    folder = tmp_path / "programs"
    now = time.time()
    fake_entry(folder, "a", 100, 900, now - 400)  # 1000 bytes, least recently used
    fake_entry(folder, "b", 100, 400, now - 100)  # 500
    fake_entry(folder, "c", 100, 900, now - 300)  # 1000
    fake_entry(folder, "d", 100, 400, now - 10)  # 500, the one just written
    program_cache._prune(folder, keep="d", cap=2100)  # 3000 bytes: a (1000) goes, then 2000 fit
    assert keys_in(folder) == ["b", "c", "d"]
    program_cache._prune(folder, keep="d", cap=999)  # c (LRU now), then b
    assert keys_in(folder) == ["d"]
    program_cache._prune(folder, keep="d", cap=0)  # the entry just written always stays
    assert keys_in(folder) == ["d"]
    fake_entry(folder, "half", None, 5000, now)  # weights whose entry is gone: counted, and first to go
    program_cache._prune(folder, keep="d", cap=1000)
    assert keys_in(folder) == ["d"]


def test_prune_by_count_and_stale_temporary_files(tmp_path, monkeypatch):
    folder = tmp_path / "programs"
    now = time.time()
    for i in range(5):
        fake_entry(folder, f"e{i}", 10, 10, now - 100 + i)
    (folder / ".tmp-dead.weights").write_bytes(b"x")
    os.utime(folder / ".tmp-dead.weights", (now - 7200, now - 7200))
    (folder / ".tmp-writing.weights").write_bytes(b"x")  # another process is writing it now
    monkeypatch.setattr(program_cache, "MAX_ENTRIES", 3)
    program_cache._prune(folder, keep="e0", cap=1 << 30)
    assert sorted(f.name for f in folder.iterdir()) == sorted(
        [".tmp-writing.weights"] + [f"{k}{s}" for k in ("e0", "e3", "e4") for s in (".pkl", ".weights")])


@pytest.mark.parametrize("text,expected", [("", program_cache.DEFAULT_MAX_SIZE), ("123", 123), ("4k", 4096),
                                           ("1.5M", 3 << 19), ("2G", 2 << 30), ("1GiB", 1 << 30), ("0", 0)])
def test_max_size_setting(monkeypatch, text, expected):
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE", text)
    assert program_cache.max_size() == expected


@pytest.mark.parametrize("text", ["lots", "-1", "5X", "G"])
def test_bad_max_size_setting_is_named(monkeypatch, text):
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE", text)
    with pytest.raises(ValueError, match="ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE"):
        program_cache.max_size()


def test_size_cap_keeps_the_recently_used_and_a_pruned_model_still_runs(cache, tiny, parses, monkeypatch):
    emb = str(next(tiny.path.glob("*embeddings*.mlpackage")))
    first = run(ReferenceBackend.load(chunk(tiny)))
    ReferenceBackend.load(emb)
    assert len(entries(cache)) == 2
    sizes = {f.stem: 0 for f in cache.iterdir()}
    for f in cache.iterdir():
        sizes[f.stem] += f.stat().st_size
    # A hit marks the chunk's entry as used, so under a cap for one entry the embeddings' goes.
    forget()
    time.sleep(0.01)
    model = ReferenceBackend.load(chunk(tiny))
    key = program_cache.program_key(chunk(tiny))
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE_MAX_SIZE", str(max(sizes.values())))
    program_cache._prune(cache)
    assert keys_in(cache) == [key]
    # Another process may remove the entry of a model in use: its mapped weights stay valid.
    program_cache._prune(cache, cap=0)
    assert keys_in(cache) == []
    np.testing.assert_array_equal(run(model), first)
    forget()
    np.testing.assert_array_equal(run(ReferenceBackend.load(chunk(tiny))), first)  # rebuilt
    assert len(parses) == 3 and keys_in(cache) == [key]


def test_an_entry_holds_each_distinct_type_once(cache, tiny):
    ReferenceBackend.load(chunk(tiny))
    forget()
    program = ReferenceBackend.load(chunk(tiny)).program  # read back from the entry
    types = [v.type for fn in program.functions.values() for op in fn.ops for v in op.outputs]
    assert len(types) > 100
    assert len({id(t) for t in types}) == len(set(types))  # one object per distinct type


def test_an_entry_holds_each_distinct_name_once(cache, tiny):
    ReferenceBackend.load(chunk(tiny))
    forget()
    program = ReferenceBackend.load(chunk(tiny)).program  # read back from the entry
    names = []
    for fn in program.functions.values():
        names += fn.outputs + [v.name for v in fn.inputs]
        for op in fn.ops:
            names += [op.type, op.name] + list(op.inputs) + list(op.attributes) + [v.name for v in op.outputs]
            names += [b for binds in op.inputs.values() for b in binds if isinstance(b, str)]
            names += [v.data for v in op.attributes.values() if isinstance(v.data, str)]
    assert len(names) > 1000 and len(set(names)) < len(names) / 3
    assert len({id(n) for n in names}) == len(set(names))  # one object per distinct string


def test_load_leaves_the_garbage_collector_as_it_found_it_and_frees_a_closed_model(cache, tiny):
    import gc
    import weakref

    assert gc.isenabled()
    gc.unfreeze()
    model = anemll_fast.load(tiny.path, backend="reference")
    assert gc.isenabled()
    assert gc.get_freeze_count() > 1000  # what the load built: no generation-0 pass over it now
    programs = [weakref.ref(p) for p in program_cache._loaded.values()]
    assert programs
    model.close()
    del model
    # What a load builds holds no reference cycles, so reference counting frees it although the
    # collector ignores it (frozen at the end of the load): no collection is run here.
    assert [r() for r in programs] == [None] * len(programs)
    gc.disable()
    try:
        anemll_fast.load(tiny.path, backend="reference").close()
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


# ------------------------------------------------------------ fusion records
@pytest.fixture
def probes(monkeypatch):
    """The shapes of every bit-exactness probe run (fusion._probe_equal), in order."""
    from anemll_fast.mil import fusion

    calls = []
    real = fusion._probe_equal

    def counting(fused, chain, shapes, fp16):
        calls.append([tuple(s) for s in shapes])
        return real(fused, chain, shapes, fp16)

    monkeypatch.setattr(fusion, "_probe_equal", counting)
    return calls


def random_inputs(model):
    rng = np.random.default_rng(7)
    out = {}
    for s in model.input_specs:
        shape = tuple(int(d) for d in s.shape)
        if s.dtype.startswith("int"):
            out[s.name] = np.full(shape, 3, np.int32)
        else:
            out[s.name] = rng.standard_normal(shape).astype(np.float16)
    return out


def run_fn(model, fn):
    m = model.function(fn)
    return m.predict(random_inputs(m), m.make_state())


def fused_fresh(model, fn):
    """`fn` of the model's program planned with fusion run afresh (no record), and its outputs."""
    from anemll_fast.backends.reference import ReferenceModel

    m = ReferenceModel(model.program, fn, {"consts": {}, "plans": {}, "fusion": None})
    return m, m.predict(random_inputs(m), m.make_state())


def fusion_file(cache):
    (f,) = cache.glob("*.fusion")
    return f


def test_second_load_replays_the_fusion_record_bit_for_bit(cache, tiny, probes):
    path = chunk(tiny)
    ReferenceBackend.load(path).function("prefill")
    assert probes  # the first load probes every chain it fuses ...
    record = json.loads(fusion_file(cache).read_text())
    assert set(record["plans"]) == {"infer", "prefill"} and record["key"] == program_cache.program_key(path)
    forget()
    probes.clear()
    model = ReferenceBackend.load(path)
    for fn in ("infer", "prefill"):
        replayed = model.function(fn)
        assert replayed._plan.fused and replayed._plan.fused == record["plans"][fn]["counts"]
        assert not probes  # ... a later one none
        fresh, expected = fused_fresh(model, fn)
        assert probes  # (the fresh plan did probe)
        probes.clear()
        assert [s.op_type for s in replayed._plan.steps] == [s.op_type for s in fresh._plan.steps]
        assert replayed._plan.fused == fresh._plan.fused
        got = run_fn(model, fn)
        assert got.keys() == expected.keys()
        for k in got:
            assert np.array_equal(got[k], expected[k], equal_nan=True), (fn, k)


def test_fusion_record_of_other_code_or_another_program_is_not_replayed(cache, tiny, probes, monkeypatch):
    from anemll_fast.mil import fusion

    path = chunk(tiny)
    ReferenceBackend.load(path)
    n = len(probes)
    f = fusion_file(cache)
    for field, value in (("code", "0" * 64), ("key", "1" * 64), ("magic", "something else")):
        data = json.loads(f.read_text())
        f.write_text(json.dumps(dict(data, **{field: value})))
        forget()
        probes.clear()
        ReferenceBackend.load(path)
        assert len(probes) == n, field  # probed again ...
        assert json.loads(f.read_text())[field] == data[field]  # ... and stored afresh
    # The same record under a new code key (another version of the interpreter or kernels): not replayed.
    monkeypatch.setattr(fusion, "_code_key", "f" * 64)
    forget()
    probes.clear()
    ReferenceBackend.load(path)
    assert len(probes) == n and json.loads(f.read_text())["code"] == "f" * 64


def _shift_anchor(plans):
    passes = plans["infer"]["passes"]
    anchor = next(a for p in passes for a in p)
    anchor[0] += 1


def _flip_probe_shapes(plans):
    passes = plans["infer"]["passes"]
    probe = next(q for p in passes for a in p for q in a[2])
    probe[3][0][-1] += 2


def _swap_functions(plans):  # each function given the other's record: same structure, other shapes
    plans["infer"], plans["prefill"] = plans["prefill"], plans["infer"]


def _extra_probe(plans):  # an anchor with an outcome no probe asks for
    passes = plans["infer"]["passes"]
    anchor = next(a for p in passes for a in p if a[2])
    anchor[2].append(list(anchor[2][-1]))


def _drop_a_match(plans):
    passes = plans["infer"]["passes"]
    next(p for p in passes if p).pop()


@pytest.mark.parametrize("damage", ["garbage", "not_a_dict", "bad_types", "shift_anchor", "probe_shapes",
                                    "swap_functions", "drop_a_match", "extra_probe"])
def test_damaged_or_unfitting_fusion_record_is_ignored_and_rebuilt(cache, tiny, probes, damage, caplog):
    path = chunk(tiny)
    first = ReferenceBackend.load(path)
    expected = {fn: run_fn(first, fn) for fn in ("infer", "prefill")}
    good = json.loads(fusion_file(cache).read_text())
    n = len(probes)
    data = json.loads(fusion_file(cache).read_text())
    if damage == "garbage":
        fusion_file(cache).write_bytes(b"\x00{" * 50)
    else:
        if damage == "not_a_dict":
            data["plans"]["infer"] = [1, 2, 3]
        elif damage == "bad_types":
            data["plans"]["infer"]["passes"] = [["x", None]] * 5
        elif damage == "shift_anchor":
            _shift_anchor(data["plans"])
        elif damage == "probe_shapes":
            _flip_probe_shapes(data["plans"])
        elif damage == "swap_functions":
            _swap_functions(data["plans"])
        elif damage == "extra_probe":
            _extra_probe(data["plans"])
        else:
            _drop_a_match(data["plans"])
        fusion_file(cache).write_text(json.dumps(data))
    forget()
    probes.clear()
    model = ReferenceBackend.load(path)
    for fn in ("infer", "prefill"):
        got = run_fn(model, fn)
        for k in got:
            assert np.array_equal(got[k], expected[fn][k], equal_nan=True), (fn, k)
    assert probes  # fused afresh
    if damage == "garbage":
        assert "damaged fusion record file" in caplog.text
    if damage != "swap_functions":  # (swapped, both functions are probed again)
        assert len(probes) <= n
    assert json.loads(fusion_file(cache).read_text())["plans"] == good["plans"]  # rebuilt whole
    forget()
    probes.clear()
    ReferenceBackend.load(path).function("prefill")
    assert not probes


def test_fusion_records_go_with_their_entry(cache, tiny):
    ReferenceBackend.load(chunk(tiny))
    assert len(list(cache.glob("*.fusion"))) == 1
    assert program_cache.clear() == 1 and list(cache.iterdir()) == []


def test_no_fusion_record_without_the_disk_cache_or_with_fusion_off(tmp_path, tiny, monkeypatch, probes):
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE", "off")
    forget()
    ReferenceBackend.load(chunk(tiny))
    assert probes
    monkeypatch.setenv("ANEMLL_FAST_PROGRAM_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("ANEMLL_FAST_FUSION", "0")
    forget()
    ReferenceBackend.load(chunk(tiny))
    assert list((tmp_path / "c").glob("*.fusion")) == []
    forget()
