"""Native samplers against numpy implementations of the same definitions."""
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chi2

from anemll_fast import _native
from anemll_fast.sampling import SamplingSettings

SETTINGS = SamplingSettings()


def settings(**kw):
    return SamplingSettings(**kw).to_native()


def split(logits, n_parts):
    """fp16 logits split into writable parts, as the LM head delivers them."""
    return [np.ascontiguousarray(p) for p in np.array_split(np.asarray(logits, np.float16), n_parts)]


def np_filtered_probs(logits, s: SamplingSettings, history=()):
    """numpy version of the chain in csrc/engine/sampler.h: probabilities after every filter."""
    x = np.asarray(logits, np.float16).astype(np.float64)
    for t, b in s.logit_bias.items():
        x[t] += b
    hist = list(history)
    window = hist if s.penalty_window is None else (hist[len(hist) - s.penalty_window:] if s.penalty_window else [])
    for t, c in Counter(window).items():
        if s.repetition_penalty != 1:
            x[t] = x[t] / s.repetition_penalty if x[t] > 0 else x[t] * s.repetition_penalty
        x[t] -= c * s.frequency_penalty + s.presence_penalty
    order = np.argsort(-x, kind="stable")
    order = order[np.isfinite(x[order])]
    if s.top_k:
        order = order[: s.top_k]
    z = x[order] / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        cut = int(np.searchsorted(np.cumsum(p), s.top_p - 1e-12)) + 1
        order, p = order[:cut], p[:cut]
    if s.min_p > 0:
        keep = p >= s.min_p * p.max()
        order, p = order[keep], p[keep]
    full = np.zeros(len(x))
    full[order] = p / p.sum()
    return full


def draw(sampler, logits, n_parts, n, history=()):
    parts = split(logits, n_parts)
    return np.array([sampler.sample(parts, list(history)) for _ in range(n)])


P_VALUE = 1e-6  # a correct sampler fails one test in a million runs


def chi_square_ok(samples, probs, bin_count=10.0):
    """Pearson chi-square of samples against probs; (statistic, critical value at P_VALUE).

    Tokens expected at least `bin_count` times get a bin each; the rest (the tail) are taken in rank order
    into consecutive bins of about `bin_count` expected draws, so that the tail's shape is tested too instead
    of being merged into one bin.
    """
    n = len(samples)
    observed = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    assert observed[probs == 0].sum() == 0, "sampled a token outside the support"
    order = np.argsort(-probs, kind="stable")
    order = order[probs[order] > 0]
    expected = probs[order] * n
    obs_sorted = observed[order]
    # Bin edges: a new bin starts once the running expected count of the current one reaches bin_count.
    bins = np.zeros(len(order), np.int64)
    acc, b = 0.0, 0
    for i, e in enumerate(expected):
        if acc >= bin_count:
            b, acc = b + 1, 0.0
        bins[i] = b
        acc += e
    if acc < bin_count and b > 0:  # fold a short last bin into the one before
        bins[bins == b] = b - 1
    exp = np.bincount(bins, weights=expected)
    obs = np.bincount(bins, weights=obs_sorted)
    df = len(exp) - 1
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, float(chi2.isf(P_VALUE, df)) if df else math.inf  # one bin: only the support is tested


def tail_shuffled(probs, keep, seed=0):
    """probs with the values of all but the `keep` most likely tokens permuted among themselves."""
    order = np.argsort(-probs, kind="stable")
    tail = order[keep:][probs[order[keep:]] > 0]
    out = probs.copy()
    out[tail] = probs[np.random.default_rng(seed).permutation(tail)]
    return out


def test_greedy_matches_numpy_argmax_across_parts():
    rng = np.random.default_rng(0)
    for trial in range(200):
        v = int(rng.integers(1, 300))
        logits = rng.normal(size=v).astype(np.float16)
        if trial % 3 == 0:  # ties: the lower id wins, as np.argmax
            logits[rng.integers(0, v, size=3)] = logits.max()
        if trial % 5 == 0:
            logits[rng.integers(0, v, size=5)] = -np.inf
        parts = split(logits, int(rng.integers(1, min(v, 16) + 1)))
        assert _native.argmax_fp16(parts) == int(np.argmax(logits))
        sampler = _native.NativeSampler(v, settings())
        assert sampler.sample(parts) == int(np.argmax(logits))


def test_greedy_ignores_nan_and_reports_all_masked():
    logits = np.array([1.0, np.nan, 3.0, -np.inf], np.float16)
    assert _native.argmax_fp16(split(logits, 2)) == 2
    sampler = _native.NativeSampler(4, settings(logit_bias={2: float("-inf"), 0: float("-inf")}))
    with pytest.raises(ValueError, match="no token left"):
        sampler.sample(split(logits, 2))


def test_negative_and_subnormal_values_order():
    logits = np.array([-3.0, -1e-7, -2.0, 6e-8, -65504.0], np.float16)
    assert _native.argmax_fp16([logits.copy()]) == int(np.argmax(logits))
    neg = np.array([-3.0, -0.5, -2.0], np.float16)
    assert _native.argmax_fp16([neg.copy()]) == 1


def test_sampling_leaves_logits_unchanged():
    logits = np.linspace(-2, 2, 64).astype(np.float16)
    parts = split(logits, 4)
    before = np.concatenate(parts).copy()
    s = _native.NativeSampler(64, settings(temperature=1.0, logit_bias={63: -5.0, 3: 2.0}, repetition_penalty=1.3))
    s.sample(parts, [1, 2, 3, 63])
    np.testing.assert_array_equal(np.concatenate(parts), before)


def test_top_k_support():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=100).astype(np.float16)
    s = _native.NativeSampler(100, settings(temperature=2.0, top_k=5, seed=3))
    got = set(draw(s, logits, 4, 3000).tolist())
    assert got == set(np.argsort(-logits.astype(np.float64), kind="stable")[:5].tolist())


def test_top_p_mass():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float16)
    for top_p, support in ((0.7, {0, 1}), (0.5, {0}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        s = _native.NativeSampler(4, settings(temperature=1.0, top_p=top_p, seed=1))
        assert set(draw(s, logits, 2, 2000).tolist()) == support, top_p


def test_min_p_threshold():
    probs = np.array([0.4, 0.3, 0.12, 0.1, 0.08])
    logits = np.log(probs).astype(np.float16)
    s = _native.NativeSampler(5, settings(temperature=1.0, min_p=0.26, seed=2))  # keeps p >= 0.104
    assert set(draw(s, logits, 1, 2000).tolist()) == {0, 1, 2}


def test_min_p_gathers_only_tokens_within_reach_of_the_best():
    # The min-p cut is relative to the best token: with a real head's spread only a handful of a large
    # vocabulary survive, and only those may be weighed (a cut relative to neighbouring values gathered
    # the whole vocabulary: correct draws, 7x the time).
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=32768) * 3).astype(np.float16)
    t, min_p = 0.7, 0.05
    top = np.sort(logits.astype(np.float64))[::-1]
    within = int(np.sum(np.exp((top - top[0]) / t) >= min_p))
    s = _native.NativeSampler(logits.size, settings(temperature=t, min_p=min_p, seed=4))
    s.sample(split(logits, 8))
    assert within <= s.candidates <= within + 64, (s.candidates, within)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = np.array([2.0, 1.9, -1.0, -1.05, 0.0], np.float16)
    s = _native.NativeSampler(5, settings(repetition_penalty=1.1))
    assert s.sample(split(logits, 1), [0]) == 1  # 2.0 / 1.1 < 1.9
    logits = np.array([-3.0, -1.0, -1.05, -5.0], np.float16)
    s = _native.NativeSampler(4, settings(repetition_penalty=1.1))
    assert s.sample(split(logits, 2), [1]) == 2  # -1.0 * 1.1 < -1.05


def test_presence_and_frequency_penalties_and_window():
    logits = np.array([3.0, 2.0, 1.0], np.float16)
    s = _native.NativeSampler(3, settings(frequency_penalty=0.4))
    assert s.sample(split(logits, 1), [0, 0]) == 0  # 3.0 - 0.8 = 2.2 > 2.0
    assert s.sample(split(logits, 1), [0, 0, 0]) == 1  # 3.0 - 1.2 = 1.8
    s = _native.NativeSampler(3, settings(presence_penalty=1.5))
    assert s.sample(split(logits, 1), [0, 0, 0, 0]) == 1  # presence counts once
    s = _native.NativeSampler(3, settings(presence_penalty=1.5, penalty_window=2))
    assert s.sample(split(logits, 1), [0, 2, 2]) == 0  # token 0 is outside the window
    s = _native.NativeSampler(3, settings(presence_penalty=1.5, penalty_window=None))
    assert s.sample(split(logits, 1), [0] + [2] * 100) == 1  # whole history


def test_logit_bias_bans_and_forces():
    logits = np.array([5.0, 1.0, 0.0, -1.0], np.float16)
    assert _native.NativeSampler(4, settings(logit_bias={0: float("-inf")})).sample(split(logits, 2)) == 1
    assert _native.NativeSampler(4, settings(logit_bias={3: 7.0})).sample(split(logits, 2)) == 3
    s = _native.NativeSampler(4, settings(temperature=1.0, logit_bias={0: float("-inf")}, seed=5))
    assert 0 not in set(draw(s, logits, 2, 500).tolist())


def test_seed_reproducibility():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=50).astype(np.float16)
    a = draw(_native.NativeSampler(50, settings(temperature=1.0, seed=42)), logits, 3, 200)
    b = draw(_native.NativeSampler(50, settings(temperature=1.0, seed=42)), logits, 3, 200)
    c = draw(_native.NativeSampler(50, settings(temperature=1.0, seed=43)), logits, 3, 200)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def plain_logits():
    return (np.random.default_rng(7).normal(size=64) * 3.0).astype(np.float16)


PLAIN_HISTORY = [3, 7, 7, 12, 40, 3, 3]
PENALTIES = dict(temperature=1.1, repetition_penalty=1.3, presence_penalty=4.0, frequency_penalty=0.2,
                 logit_bias={7: 1.5, 9: float("-inf")})
LONG_HISTORY = [3] * 20 + [7, 12, 12, 41]
WINDOW_HISTORY = [40, 40, 20, 3, 3, 12, 7, 12]  # a window of 6 starts at 20; 40 lies just outside


def penalty_logits(history, window):
    """Logits under which every penalized token of `history` (and 20, 21, 40 when not penalized) ends at about
    the same logit, 2.6, above a low background: each penalty then moves much probability, so that a 5 %
    error in any of them, or a window one off, shows."""
    x = np.random.default_rng(8).normal(size=64) - 4.0
    x[[20, 21, 40]] = 2.6
    recent = history if window is None else history[-window:]
    for t, c in Counter(recent).items():
        x[t] = (2.6 - PENALTIES["logit_bias"].get(t, 0.0) + c * PENALTIES["frequency_penalty"]
                + PENALTIES["presence_penalty"]) * PENALTIES["repetition_penalty"]
    x[41] = -1.0  # a negative penalized logit: multiplied by the repetition penalty
    return x.astype(np.float16)


def _off(kw, name, factor):
    return {**kw, name: kw[name] * factor}


# name: (logits, history, settings, draws, deliberately wrong settings the samples must reject). The wrong
# variants are 5 % parameter errors, a window or top-k one off, or a reshuffled tail ("tail"): each case is
# built so that it has the power to see its variants at P_VALUE. (A 5 % error in a top-p or min-p threshold
# changes nothing unless a token sits within it, so those are tested with the cuts that do move.)
PW = {**PENALTIES, "penalty_window": None}
CHI_SQUARE_CASES = {
    "temperature": (plain_logits, PLAIN_HISTORY, dict(temperature=1.0), 40000,
                    [dict(temperature=1.05), dict(temperature=0.95), "tail"]),
    "top_k": (plain_logits, PLAIN_HISTORY, dict(temperature=1.0, top_k=10), 20000,
              [dict(temperature=1.0, top_k=9), dict(temperature=1.0, top_k=11)]),
    "top_p": (plain_logits, PLAIN_HISTORY, dict(temperature=1.3, top_p=0.9), 40000,
              [dict(temperature=1.365, top_p=0.9), dict(temperature=1.3, top_p=0.855), "tail"]),
    # min_p just below the 5th token's ratio to the best (0.0598 at temperature 1, 0.0223 for the 7th at 0.9)
    "min_p": (plain_logits, PLAIN_HISTORY, dict(temperature=1.0, min_p=0.058), 20000,
              [dict(temperature=1.0, min_p=0.0609)]),
    "chain": (plain_logits, PLAIN_HISTORY, dict(temperature=0.9, top_k=30, top_p=0.95, min_p=0.022), 20000,
              [dict(temperature=0.9, top_k=30, top_p=0.9025, min_p=0.022),
               dict(temperature=0.9, top_k=30, top_p=0.95, min_p=0.0231)]),
    "penalties_whole_history": (lambda: penalty_logits(LONG_HISTORY, None), LONG_HISTORY, PW, 40000,
                                [_off(PW, n, f) for n in ("repetition_penalty", "presence_penalty",
                                                          "frequency_penalty") for f in (0.95, 1.05)] + ["tail"]),
    "penalties_window": (lambda: penalty_logits(WINDOW_HISTORY, 6), WINDOW_HISTORY, {**PENALTIES, "penalty_window": 6},
                         20000, [{**PENALTIES, "penalty_window": 5}, {**PENALTIES, "penalty_window": 7},
                                 {**PENALTIES, "penalty_window": 6, "repetition_penalty": 1.235}]),
}


@pytest.mark.parametrize("name", sorted(CHI_SQUARE_CASES))
def test_chi_square_against_numpy_with_negative_controls(name):
    make_logits, history, kw, n, wrongs = CHI_SQUARE_CASES[name]
    logits = make_logits()
    s = SamplingSettings(seed=11, **kw)
    samples = draw(_native.NativeSampler(64, s.to_native()), logits, 4, n, history)
    probs = np_filtered_probs(logits, s, history)
    stat, critical = chi_square_ok(samples, probs)
    assert stat < critical, (stat, critical)
    # The same samples must reject each wrong expectation, or passing above proves nothing.
    for wrong in wrongs:
        expected = tail_shuffled(probs, keep=4) if wrong == "tail" else \
            np_filtered_probs(logits, SamplingSettings(**wrong), history)
        assert rejects(samples, expected), wrong


def rejects(samples, probs) -> bool:
    """Whether the samples reject `probs`: a sample outside its support, or the statistic past the critical value."""
    try:
        stat, critical = chi_square_ok(samples, probs)
    except AssertionError:
        return True
    return stat > critical


def test_logprobs_of_raw_distribution():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=300).astype(np.float16)
    s = _native.NativeSampler(300, settings(temperature=0.8, logprobs=5, seed=1, logit_bias={0: 3.0}))
    tok = s.sample(split(logits, 3))
    chosen, top = s.logprobs()
    x = logits.astype(np.float64)
    lsm = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    assert chosen == pytest.approx(lsm[tok], abs=1e-4)
    best = np.argsort(-x, kind="stable")[:5]
    assert [t for t, _ in top] == best.tolist()
    np.testing.assert_allclose([lp for _, lp in top], lsm[best], atol=1e-4)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(frequency_penalty="x"), "frequency_penalty"),
        (dict(penalty_window=-3), "penalty_window"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={1: float("inf")}), "logit_bias"),
        (dict(seed=-1), "seed"),
        (dict(logprobs=5000), "logprobs"),
    ],
)
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingSettings(**kw)


def test_native_sampler_rejects_bias_outside_vocab():
    with pytest.raises(ValueError, match="logit_bias"):
        _native.NativeSampler(10, settings(logit_bias={10: 1.0}))


def test_chi_square_top_p_over_a_large_vocabulary():
    # > 1024 candidates: the sampler sorts only a head of the distribution.
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=3000) * 2.5).astype(np.float16)
    s = SamplingSettings(temperature=1.0, top_p=0.8, seed=4)
    samples = draw(_native.NativeSampler(3000, s.to_native()), logits, 6, 20000)
    stat, critical = chi_square_ok(samples, np_filtered_probs(logits, s))
    assert stat < critical, (stat, critical)


# ------------------------------------------- whole-vocabulary paths (histogram select)
QWEN_V = 151936  # 16 parts of 9496, as Qwen's split LM head


def qwen_logits(seed=0, scale=3.0):
    return (np.random.default_rng(seed).normal(size=QWEN_V) * scale).astype(np.float16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.0, top_p=0.5, min_p=0.02),
        dict(temperature=0.7),  # no filter at all: the per-value weight walk
        dict(temperature=0.8, min_p=0.01),
        dict(temperature=0.7, top_k=1000),
        dict(temperature=0.9, top_k=1000, top_p=0.95),
        dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
             logit_bias={5: 40.0, 9: float("-inf"), 77: 12.0}, penalty_window=None),
    ],
)
def test_chi_square_over_a_qwen_sized_vocabulary(kw):
    logits = qwen_logits()
    # Penalize the current best tokens so that the overrides land inside the nucleus.
    best = [int(t) for t in np.argsort(-logits.astype(np.float64), kind="stable")[:4]]
    history = [best[0], best[0], best[1], best[3], 77]
    s = SamplingSettings(seed=9, **kw)
    samples = draw(_native.NativeSampler(QWEN_V, s.to_native()), logits, 16, 8000, history)
    probs = np_filtered_probs(logits, s, history)
    stat, critical = chi_square_ok(samples, probs)
    assert stat < critical, (stat, critical)
    if (probs > 0).sum() > 100:  # negative control: the same samples reject the tail reshuffled
        stat, critical = chi_square_ok(samples, tail_shuffled(probs, keep=20))
        assert stat > critical, (stat, critical)


def test_top_p_cut_inside_a_run_of_ties_takes_lowest_ids():
    # 12 tokens tie at the top with mass 1/12 each (the tail holds ~0): top_p=0.3
    # needs exactly 4 of them, and the lower ids must win, also for -0/+0.
    v = 20000
    logits = np.full(v, -30.0, np.float16)
    tied = np.sort(np.random.default_rng(3).choice(v, 12, replace=False))
    logits[tied] = 4.0
    for top_p in (0.3, 0.25 + 1e-3):
        s = _native.NativeSampler(v, settings(temperature=1.0, top_p=top_p, seed=2))
        assert set(draw(s, logits, 7, 1500).tolist()) == set(tied[:4].tolist()), top_p
    zeros = np.full(v, -30.0, np.float16)
    zeros[[10, 500, 9000]] = np.float16(-0.0)
    zeros[[20, 700]] = np.float16(0.0)
    s = _native.NativeSampler(v, settings(temperature=1.0, top_p=0.5, seed=2))  # 3 of the 5 zeros
    assert set(draw(s, zeros, 5, 1500).tolist()) == {10, 20, 500}


def test_large_top_k_ties_at_the_boundary_take_lowest_ids():
    v = 50000
    logits = np.full(v, -1.0, np.float16)
    logits[:600] = np.linspace(5, 6, 600).astype(np.float16)
    tied = np.sort(np.random.default_rng(4).choice(np.arange(600, v), 900, replace=False))
    logits[tied] = 2.0
    expected = set(np.argsort(-logits.astype(np.float64), kind="stable")[:1000].tolist())
    s = SamplingSettings(temperature=50.0, top_k=1000, seed=1)  # nearly flat: every kept token shows up
    got = set(draw(_native.NativeSampler(v, s.to_native()), logits, 5, 15000).tolist())
    assert got == expected


def test_tiny_top_p_is_the_argmax_and_top_p_one_keeps_everything():
    logits = qwen_logits(seed=1)
    logits[[1000, 42]] = logits.max()  # a tie at the top: the lower id wins
    s = _native.NativeSampler(QWEN_V, settings(temperature=0.7, top_p=1e-6, seed=3))
    assert set(draw(s, logits, 16, 200).tolist()) == {42}
    flat = np.zeros(300, np.float16)
    s = _native.NativeSampler(300, settings(temperature=1.0, top_p=1.0, seed=3))
    samples = draw(s, flat, 3, 30000)
    assert set(samples.tolist()) == set(range(300))
    stat, critical = chi_square_ok(samples, np.full(300, 1 / 300))
    assert stat < critical


def test_whole_vocabulary_paths_with_extreme_values():
    # Values across the whole fp16 range, NaN, -inf and a tiny temperature:
    # the per-value weights must neither overflow nor pick an impossible token.
    v = 30000
    rng = np.random.default_rng(5)
    logits = rng.uniform(-65000, 60000, size=v).astype(np.float16)
    logits[rng.integers(0, v)] = 65504.0  # a unique best (fp16 steps are 32 up there)
    logits[rng.integers(0, v, 50)] = np.nan
    logits[rng.integers(0, v, 50)] = -np.inf
    finite = np.where(np.isfinite(logits), logits.astype(np.float64), -np.inf)
    best = int(np.argmax(finite))
    for kw in (dict(temperature=0.01, top_p=0.9), dict(temperature=0.01), dict(temperature=0.01, min_p=0.5),
               dict(temperature=1e4, top_p=0.9), dict(temperature=0.01, top_k=500)):
        s = _native.NativeSampler(v, settings(seed=1, **kw))
        got = draw(s, logits, 3, 50)
        assert np.isfinite(finite[got]).all(), kw
        if kw["temperature"] == 0.01:
            assert set(got.tolist()) == {best}, kw
    s = SamplingSettings(temperature=1e4, top_p=0.9, seed=2)
    samples = draw(_native.NativeSampler(v, s.to_native()), logits, 3, 20000)
    stat, critical = chi_square_ok(samples, np_filtered_probs(np.where(np.isnan(logits), -np.inf, logits), s))
    assert stat < critical, (stat, critical)


def test_whole_vocabulary_all_masked_reports_no_token():
    logits = np.full(5000, -np.inf, np.float16)
    logits[7] = np.nan
    for kw in (dict(top_p=0.9), dict(), dict(min_p=0.1), dict(top_k=1000)):
        s = _native.NativeSampler(5000, settings(temperature=1.0, **kw))
        with pytest.raises(ValueError, match="no token left"):
            s.sample(split(logits, 4))
    # Only an override is left: it is the answer.
    s = _native.NativeSampler(5000, settings(temperature=1.0, top_p=0.9, logit_bias={3: 1.0}))
    finite = logits.copy()
    finite[3] = 0.0
    assert s.sample(split(finite, 4)) == 3


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7, top_p=0.9, logit_bias={1: 2.0}, repetition_penalty=1.2),
    dict(temperature=0.7),
    dict(temperature=0.7, min_p=0.05),
    dict(temperature=0.7, top_k=1000, top_p=0.9),
], ids=["top_p", "plain", "min_p", "top_k_1000"])
def test_whole_vocabulary_paths_allocate_nothing_per_step(kw):
    from test_native import null_config

    from anemll_fast.engine import Engine

    eng = Engine(null_config(V=32768, parts=8), "null", sampling=SamplingSettings(seed=1, **kw))
    rng = np.random.default_rng(0)
    for part in eng._eng.logits_views():
        part[:] = (rng.normal(size=part.shape) * 3).astype(np.float16)
    eng.prefill(list(range(20)))
    tok = eng.step(19, 19)  # warm-up
    _native.alloc_counting(True)
    try:
        before = _native.alloc_counter()
        for pos in range(20, 60):
            tok = eng._eng.step(tok, pos)
        used = _native.alloc_counter() - before
    finally:
        _native.alloc_counting(False)
    assert used == 0
