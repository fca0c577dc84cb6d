"""No heap allocation in a decode step, counted for the whole process.

A counter library (tests/malloc_counter.c, built here with the system C compiler) is preloaded into a
subprocess; it counts every malloc/calloc/realloc/posix_memalign/aligned_alloc/memalign/valloc call, and so
every operator new, std::string or stream, of any library and thread, while its window is open. The window
is opened and closed in C around the engine's decode steps (`_native._count_step_allocations`), so the
count is the steps' own. Negative controls, backends that allocate a std::string, call malloc or build an
ostringstream inside each predict, must be caught, or a zero proves nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the preloaded counter relies on glibc (Linux only)")

STEPS = 50
SAMPLINGS = {
    "greedy": {},
    "full_chain": dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                       presence_penalty=0.2, frequency_penalty=0.1, logit_bias={1: 2.0, 7: float("-inf")},
                       seed=3, logprobs=5),
    "whole_vocabulary_top_p": dict(temperature=1.0, top_p=0.95, penalty_window=None),
}
# none: the null backend; null_padded: the null backend holding hidden states and logits in its own memory,
# rows padded (the engine maps them around host reads, as with Core ML's pixel buffers); copy: a backend
# copying outputs it holds in padded rows into the engine's buffers; none_timed: the null backend with the
# engine's per-part timing counters on (anemll-fast bench). The rest are the negative controls.
BACKENDS = ("none", "null_padded", "none_timed", "copy", "string", "malloc", "ostringstream")

SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from anemll_fast import _native
from anemll_fast.engine import Engine
from anemll_fast.sampling import SamplingSettings
from test_native import null_config

steps, samplings, backends = int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {}
for backend in backends:
    for name, kw in samplings.items():
        kw = {k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in kw.items()}
        mode = "none" if backend == "none_timed" else backend
        native = _native.NullBackend(buffer_row_pad=8) if backend == "null_padded" else _native.AllocProbeBackend(mode)
        eng = Engine(null_config(), native, sampling=SamplingSettings(**kw))
        eng._eng.set_timing(backend == "none_timed")
        if mode in ("none", "null_padded"):  # the null backend leaves logits alone: give them shape
            rng = np.random.default_rng(0)
            for part in eng._eng.logits_views():
                part[:] = rng.normal(size=part.shape).astype(np.float16)
        eng.prefill(list(range(20)))
        tok = eng.step(19, 19)  # warm-up: first-use work belongs to no step
        count, _ = _native._count_step_allocations(eng._eng, tok, 20, steps)
        out[f"{backend}/{name}"] = count
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def counter_library(tmp_path_factory):
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        cc = "cc"
    lib = tmp_path_factory.mktemp("alloc") / "libmalloc_counter.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(HERE / "malloc_counter.c")],
                   check=True, capture_output=True, timeout=120)
    return lib


@pytest.fixture(scope="module")
def counts(counter_library):
    env = dict(os.environ, LD_PRELOAD=str(counter_library), OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE), str(STEPS), json.dumps(SAMPLINGS),
                          json.dumps(BACKENDS)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("backend", ["none", "null_padded", "none_timed", "copy"])
def test_no_heap_allocation_in_a_decode_step(counts, backend, sampling):
    assert counts[f"{backend}/{sampling}"] == 0


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("backend", ["string", "malloc", "ostringstream"])
def test_negative_controls_allocating_in_a_step_are_caught(counts, backend, sampling):
    # Every step calls the backend at least once per part (embeddings, two chunks, head).
    assert counts[f"{backend}/{sampling}"] >= 4 * STEPS


def test_the_window_needs_the_preloaded_counter():
    from anemll_fast import _native
    from anemll_fast.engine import Engine
    from test_native import null_config

    eng = Engine(null_config(), _native.AllocProbeBackend("none"))
    eng.prefill([1, 2, 3])
    with pytest.raises(RuntimeError, match="LD_PRELOAD"):
        _native._count_step_allocations(eng._eng, 3, 3, 1)
    with pytest.raises(ValueError, match="mode"):
        _native.AllocProbeBackend("sometimes")
