"""A plan drops each intermediate value after its last reader (anemll_fast/mil/liveness.py)."""
from __future__ import annotations

import numpy as np

from anemll_fast.mil.liveness import dead_after, with_release
from anemll_fast.mil.plan import Plan
from anemll_fast.mil.text_parser import parse_mil_text

TEXT = """program(1.3)
{
    func main<ios18>(tensor<fp32, [2, 3]> x) {
        tensor<fp32, [2, 3]> a = add(x = x, y = fp32(1))[name = string("a")];
        tensor<fp32, [2, 3]> b = mul(x = a, y = fp32(2))[name = string("b")];
        tensor<fp32, [2, 3]> unused = exp(x = a)[name = string("unused")];
        tensor<fp32, [2, 3]> c = sub(x = b, y = a)[name = string("c")];
        tensor<fp32, [3, 2]> t = transpose(x = c, perm = tensor<int32, [2]>([1, 0]))[name = string("t")];
        tensor<fp32, [3, 2]> d = mul(x = t, y = fp32(3))[name = string("d")];
    } -> (%s);
}
"""


def test_dead_after_lists_each_slot_at_its_last_reader():
    steps = [((0,), (1,)), ((1,), (2,)), ((1, 2), (3,)), ((0,), (5,)), ((3,), (4,))]
    assert dead_after(steps, keep=[4]) == [(), (), (1, 2), (0, 5), (3,)]
    assert dead_after(steps, keep=[4, 5, 1]) == [(), (), (2,), (0,), (3,)]


def test_with_release_clears_the_slots_after_the_step():
    seen = []
    env = [1, 2, 3, 4]
    with_release(lambda e: seen.append(list(e)), (0, 2))(env)
    assert seen == [[1, 2, 3, 4]] and env == [None, 2, None, 4]
    step = lambda e: None  # noqa: E731
    assert with_release(step, ()) is step


def _run_keeping_env(plan, x):
    env = plan.template.copy()
    env[plan.input_slots[0]] = x
    for run in plan._runs:
        run(env)
    return env


def test_plan_holds_only_its_outputs_after_a_run():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for outs, want in (("c, d", {"c": x + 1, "d": 3 * (x + 1).T}),
                       ("t", {"t": (x + 1).T})):  # a view whose base's slot is released
        plan = Plan(parse_mil_text(TEXT % outs), "main", fuse=False)
        got = plan.run([x], [])
        for (name, ref), value in zip(want.items(), got):
            np.testing.assert_array_equal(value, ref, err_msg=name)
        env = _run_keeping_env(plan, x)
        held = [s for s, v in enumerate(env)
                if isinstance(v, np.ndarray) and s not in plan.output_slots and v is not plan.template[s]]
        assert held == [], held
