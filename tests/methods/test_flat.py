"""The flat baselines of docs/method.md §2 against float64 references written here from docs/method.md.

The references use numpy and plain loops over entries; they never call epimer's helpers. DARE's
reference re-derives the documented mask rule (blake2b of seed, name, task; ``torch.rand <
density`` on the CPU generator) so that a change of the rule, which would silently change
every merged model, fails here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epimer import InputError, get_method
from epimer.methods import ties as ties_mod
from epimer.methods.base import (
    ShardedStream,
    Stream,
    TensorInputs,
    Visitor,
)
from epimer.methods.ties import (
    StreamingKthLargest,
    global_thresholds,
    kth_largest_magnitude,
)
from tests.reference import make_inputs
from tests.reference import run as run_method

Model = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]

# derandomized: the same examples on every run, so a failure always reproduces
SETTINGS = settings(max_examples=15, deadline=None, database=None, derandomize=True)

# several tensors of mixed shapes, 1-D included
SHAPES: dict[str, tuple[int, ...]] = {"w1": (6, 5), "b1": (5,), "w2": (3, 7), "g": (4,), "s": (1,)}


# --------------------------------------------------------------------------- harness


def run(
    method_name: str,
    raw: dict[str, Any] | None,
    base: Model,
    deltas: Sequence[Model],
    weights: Sequence[float] | None = None,
    order: Sequence[str] | None = None,
) -> Arrays:
    """θ = θ0 + scale·Δ in float64 for every tensor, driving prepare() and merge() like the
    engine through the one test harness (`tests.reference`). ``order`` streams the tensors
    in another order (the result must not depend on it)."""
    inputs = inputs_of(base, deltas, weights)
    if order is not None:
        by_name = {x.name: x for x in inputs}
        inputs = [by_name[n] for n in order]
    scale = get_method(method_name).scale(get_method(method_name).parse_params(raw))
    out = {}
    for x, result in zip(inputs, run_method(method_name, raw, inputs)):
        delta = result.delta
        assert delta.dtype == torch.float32 and delta.shape == x.base.shape
        out[x.name] = x.base.double().numpy() + scale * delta.double().numpy()
    return out


def inputs_of(base: Model, deltas: Sequence[Model], weights: Sequence[float] | None = None) -> list[TensorInputs]:
    """One TensorInputs per tensor, as the engine builds them (`tests.reference.make_inputs`)."""
    return [make_inputs(name, [d[name] for d in deltas], None, weights, base=b) for name, b in base.items()]


def stream_of(inputs: Sequence[TensorInputs]) -> Stream:
    """The engine's stream: visits every tensor once, in order, each time it is called."""

    def stream(visit: Visitor) -> None:
        for x in inputs:
            visit(x)

    return stream


def random_model(seed: int, shapes: dict[str, tuple[int, ...]]) -> tuple[Model, list[Model]]:
    """A base and three task vectors, standard normal."""
    gen = torch.Generator().manual_seed(seed)

    def model() -> Model:
        return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}

    return model(), [model() for _ in range(3)]


def assert_matches(got: Arrays, ref: Arrays) -> None:
    """Equal to 1e-6 relative to the largest magnitude of the reference tensor."""
    assert got.keys() == ref.keys()
    for name in ref:
        tol = 1e-6 * max(1.0, float(np.abs(ref[name]).max(initial=0.0)))
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=tol, err_msg=name)


def normalised(weights: Sequence[float] | None, num_tasks: int) -> np.ndarray:
    w = np.ones(num_tasks) if weights is None else np.asarray(weights, dtype=np.float64)
    return w / w.sum()


shapes_strategy = st.dictionaries(
    keys=st.sampled_from(["a", "b", "c", "d"]),
    values=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    min_size=1,
    max_size=4,
)
weights_strategy = st.one_of(st.none(), st.lists(st.floats(0.1, 3.0), min_size=3, max_size=3))


# --------------------------------------------------------------------------- references (float64)


def np_model(model: Model) -> Arrays:
    return {n: v.double().numpy() for n, v in model.items()}


def floor_density(density: float, size: int) -> int:
    return math.floor(Fraction(str(density)) * size)


def ref_trim(deltas: list[Arrays], density: float, scope: str) -> list[Arrays]:
    """Each task keeps the entries with |τ| >= its k-th largest magnitude in scope (none if k=0)."""
    names = list(deltas[0])
    groups = [names] if scope == "global" else [[n] for n in names]
    out: list[Arrays] = []
    for task in deltas:
        kept = {}
        for group in groups:
            mags = np.concatenate([np.abs(task[n]).ravel() for n in group])
            k = floor_density(density, mags.size)
            threshold = np.sort(mags)[::-1][k - 1] if k > 0 else np.inf
            for n in group:
                kept[n] = np.where(np.abs(task[n]) >= threshold, task[n], 0.0)
        out.append(kept)
    return out


def ref_sign_consensus(vectors: list[Arrays], sign: str) -> Arrays:
    """Elect γ per entry, then average the non-zero values whose sign is γ (plain loops)."""
    out = {}
    for name, first in vectors[0].items():
        merged = np.zeros_like(first)
        for idx in np.ndindex(first.shape):
            values = [v[name][idx] for v in vectors]
            if sign == "mass":
                gamma = np.sign(sum(values))
            else:
                gamma = np.sign(sum(np.sign(v) for v in values))
            agree = [v for v in values if v != 0 and np.sign(v) == gamma]
            merged[idx] = sum(agree) / max(1, len(agree))
        out[name] = merged
    return out


def ref_sum(vectors: list[Arrays], factors: np.ndarray) -> Arrays:
    return {n: sum(f * v[n] for f, v in zip(factors, vectors)) for n in vectors[0]}


def scaled(vectors: list[Arrays], factors: np.ndarray) -> list[Arrays]:
    return [{n: f * x for n, x in v.items()} for f, v in zip(factors, vectors)]


def theta(base: Model, delta: Arrays, scale: float) -> Arrays:
    return {n: b + scale * delta[n] for n, b in np_model(base).items()}


def ref_mask(seed: int, name: str, task: int, shape: tuple[int, ...], density: float) -> np.ndarray:
    key = f"{seed}\0{name}\0{task}".encode()
    seed64 = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    gen = torch.Generator().manual_seed(seed64)
    return (torch.rand(shape, generator=gen) < density).numpy()


# --------------------------------------------------------------------------- methods vs references


@SETTINGS
@given(seed=st.integers(0, 2**31), shapes=shapes_strategy, weights=weights_strategy)
def test_weight_average_is_weighted_mean_of_models(
    seed: int, shapes: dict, weights: list | None
) -> None:
    base, deltas = random_model(seed, shapes)
    w = normalised(weights, 3)
    base64 = np_model(base)
    models = [{n: base64[n] + d for n, d in np_model(task).items()} for task in deltas]  # θ_t
    ref = {n: sum(w[t] * models[t][n] for t in range(3)) for n in base}
    assert_matches(run("weight_average", None, base, deltas, weights), ref)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    shapes=shapes_strategy,
    weights=weights_strategy,
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0)),
)
def test_task_arithmetic_matches_reference(
    seed: int, shapes: dict, weights: list | None, scale: float | None
) -> None:
    base, deltas = random_model(seed, shapes)
    raw = None if scale is None else {"scale": scale}
    factors = 3 * normalised(weights, 3)  # T·w_t: 1 each for equal weights (docs/method.md §2's Σ τ_t)
    expected_scale = 0.3 if scale is None else scale
    ref = theta(base, ref_sum([np_model(d) for d in deltas], factors), expected_scale)
    assert_matches(run("task_arithmetic", raw, base, deltas, weights), ref)


def test_task_arithmetic_default_is_sum_of_task_vectors_times_0_3() -> None:
    base, deltas = random_model(1, SHAPES)
    ref = {
        n: base[n].double().numpy() + 0.3 * sum(d[n].double().numpy() for d in deltas)
        for n in base
    }
    assert_matches(run("task_arithmetic", None, base, deltas), ref)


@pytest.mark.parametrize("sign", ["mass", "frequency"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    density=st.sampled_from([0.05, 0.2, 0.29, 0.5, 0.77, 1.0]),
    weights=weights_strategy,
    shapes=st.one_of(st.just(SHAPES), shapes_strategy),
)
def test_ties_matches_reference(
    sign: str, scope: str, seed: int, density: float, weights: list | None, shapes: dict
) -> None:
    base, deltas = random_model(seed, shapes)
    raw = {"density": density, "sign": sign, "scope": scope, "scale": 0.7}
    trimmed = ref_trim([np_model(d) for d in deltas], density, scope)
    ref = theta(base, ref_sign_consensus(scaled(trimmed, 3 * normalised(weights, 3)), sign), 0.7)
    assert_matches(run("ties", raw, base, deltas, weights), ref)


@pytest.mark.parametrize(
    "combine,sign", [("task_arithmetic", "mass"), ("ties", "mass"), ("ties", "frequency")]
)
@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    dare_seed=st.integers(0, 1000),
    density=st.sampled_from([0.1, 0.5, 0.9, 1.0]),
    weights=weights_strategy,
)
def test_dare_matches_reference(
    combine: str, sign: str, seed: int, dare_seed: int, density: float, weights: list | None
) -> None:
    base, deltas = random_model(seed, SHAPES)
    raw = {"density": density, "seed": dare_seed, "combine": combine, "sign": sign, "scale": 1.3}
    dropped = [
        {
            n: np.where(ref_mask(dare_seed, n, t, v.shape, density), v / density, 0.0)
            for n, v in np_model(d).items()
        }
        for t, d in enumerate(deltas)
    ]
    factors = 3 * normalised(weights, 3)
    if combine == "task_arithmetic":
        delta = ref_sum(dropped, factors)
    else:
        delta = ref_sign_consensus(scaled(dropped, factors), sign)
    assert_matches(run("dare", raw, base, deltas, weights), theta(base, delta, 1.3))


# --------------------------------------------------------------------------- invariances


ORDER_CASES = [
    ("weight_average", None),
    ("task_arithmetic", {"scale": 0.5}),
    ("ties", {"density": 0.3, "sign": "mass", "scope": "global"}),
    ("ties", {"density": 0.3, "sign": "frequency", "scope": "tensor"}),
    ("dare", {"density": 1.0, "combine": "ties"}),  # nothing dropped: the masks cannot differ
]


ALL_CASES = [
    *ORDER_CASES,
    ("dare", {"density": 0.4}),
    ("dare", {"density": 0.4, "combine": "ties"}),
]


@pytest.mark.parametrize("name,raw", ORDER_CASES)
@pytest.mark.parametrize("perm", [(1, 2, 0), (2, 0, 1), (0, 2, 1)])
def test_task_order_does_not_matter(name: str, raw: dict | None, perm: tuple[int, ...]) -> None:
    base, deltas = random_model(7, SHAPES)
    weights = [0.5, 1.0, 2.0]
    got = run(name, raw, base, [deltas[i] for i in perm], [weights[i] for i in perm])
    assert_matches(got, run(name, raw, base, deltas, weights))


@pytest.mark.parametrize(
    "name,raw", [("ties", {"scope": "global"}), ("dare", {"combine": "ties", "seed": 3})]
)
def test_tensor_order_does_not_matter(name: str, raw: dict) -> None:
    base, deltas = random_model(8, SHAPES)
    got = run(name, raw, base, deltas, order=list(reversed(SHAPES)))
    ref = run(name, raw, base, deltas)
    for n in SHAPES:
        np.testing.assert_array_equal(got[n], ref[n])


@pytest.mark.parametrize("name,raw", ALL_CASES)
def test_inputs_are_not_mutated(name: str, raw: dict | None) -> None:
    base, deltas = random_model(9, SHAPES)
    copies = [{n: v.clone() for n, v in d.items()} for d in deltas]
    base_copy = {n: v.clone() for n, v in base.items()}
    run(name, raw, base, deltas)
    for d, c in zip(deltas, copies):
        for n in d:
            assert torch.equal(d[n], c[n])
    for n in base:
        assert torch.equal(base[n], base_copy[n])


@pytest.mark.parametrize("name,raw", ALL_CASES)
def test_zero_task_vectors_give_the_base(name: str, raw: dict | None) -> None:
    base, _ = random_model(10, SHAPES)
    zeros = [{n: torch.zeros_like(v) for n, v in base.items()} for _ in range(3)]
    got = run(name, raw, base, zeros)
    for n in base:
        np.testing.assert_array_equal(got[n], base[n].double().numpy())


# --------------------------------------------------------------------------- TIES counts and scope


def distinct_single_task(
    seed: int, shapes: dict[str, tuple[int, ...]]
) -> tuple[Model, list[Model]]:
    """One task whose magnitudes are 1..D in random order and with random signs (all distinct)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [math.prod(s) for s in shapes.values()]
    mags = (torch.randperm(sum(sizes), generator=gen) + 1).float()
    signs = torch.where(torch.rand(sum(sizes), generator=gen) < 0.5, -1.0, 1.0)
    flat = (mags * signs).split(sizes)
    delta = {n: f.reshape(s) for (n, s), f in zip(shapes.items(), flat)}
    return {n: torch.zeros(s) for n, s in shapes.items()}, [delta]


@pytest.mark.parametrize("scope", ["global", "tensor"])
@SETTINGS
@given(seed=st.integers(0, 2**31), shapes=shapes_strategy, density=st.floats(0.01, 1.0))
def test_ties_keeps_exactly_floor_density_entries_when_magnitudes_are_distinct(
    scope: str, seed: int, shapes: dict, density: float
) -> None:
    base, deltas = distinct_single_task(seed, shapes)
    # with one task the disjoint mean is the trimmed vector itself
    got = run("ties", {"density": density, "scope": scope}, base, deltas)
    if scope == "global":
        expected = floor_density(density, sum(v.size for v in got.values()))
        assert sum(int(np.count_nonzero(v)) for v in got.values()) == expected
    else:
        for n, v in got.items():
            assert np.count_nonzero(v) == floor_density(density, v.size), n
    # and the kept entries are the largest ones, unchanged
    kept = np.concatenate([v.ravel() for v in got.values()])
    orig = np.concatenate([v.double().numpy().ravel() for v in deltas[0].values()])
    assert np.array_equal(kept[kept != 0], orig[kept != 0])


def test_ties_keep_count_uses_the_decimal_density() -> None:
    # 0.29 · 100 is 28.999999999999996 in floating point; floor(density · D) is 29
    base, deltas = distinct_single_task(0, {"x": (100,)})
    got = run("ties", {"density": 0.29, "scope": "tensor"}, base, deltas)
    assert np.count_nonzero(got["x"]) == 29


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_keeps_entries_tied_with_the_threshold(scope: str) -> None:
    values = [5.0, 0.5, -3.0, 4.0, 3.0, 1.0, 3.0, 2.0, -3.0, 0.25]  # k = 3 → threshold 3
    base = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
    delta = {"a": torch.tensor(values[:4]), "b": torch.tensor(values[4:]).reshape(2, 3)}
    if scope == "tensor":  # one tensor holding everything, so that both scopes see the same D
        base, delta = {"x": torch.zeros(10)}, {"x": torch.tensor(values)}
    got = run("ties", {"density": 0.3, "scope": scope}, base, [delta])
    kept = np.concatenate([v.ravel() for v in got.values()])
    assert sorted(kept[kept != 0].tolist()) == [-3.0, -3.0, 3.0, 3.0, 4.0, 5.0]


def test_ties_keeps_nothing_when_floor_density_is_zero() -> None:
    base, deltas = random_model(3, {"x": (7,), "y": (3, 4)})
    for scope in ("global", "tensor"):
        got = run("ties", {"density": 0.01, "scope": scope}, base, deltas)  # floor(0.01·19) = 0
        for n in base:
            np.testing.assert_array_equal(got[n], base[n].double().numpy())


def test_ties_global_and_tensor_scope_differ_and_match_their_references() -> None:
    gen = torch.Generator().manual_seed(4)
    shapes = {"small": (8, 6), "large": (10,), "mid": (5, 4)}
    magnitude = {"small": 0.01, "large": 100.0, "mid": 1.0}
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    deltas = [
        {n: magnitude[n] * torch.randn(s, generator=gen) for n, s in shapes.items()}
        for _ in range(3)
    ]
    results = {}
    for scope in ("global", "tensor"):
        results[scope] = run("ties", {"density": 0.25, "scope": scope}, base, deltas)
        trimmed = ref_trim([np_model(d) for d in deltas], 0.25, scope)
        assert_matches(results[scope], theta(base, ref_sign_consensus(trimmed, "mass"), 1.0))
    # global trimming spends the budget on the large tensor and leaves the small one at the base
    np.testing.assert_array_equal(results["global"]["small"], base["small"].double().numpy())
    assert not np.array_equal(results["tensor"]["small"], base["small"].double().numpy())


def test_ties_global_prepare_streams_twice_and_tensor_scope_never() -> None:
    base, deltas = random_model(5, SHAPES)
    inputs = inputs_of(base, deltas)
    calls = []

    def stream(visit: Visitor) -> None:
        calls.append(1)
        stream_of(inputs)(visit)

    method = get_method("ties")
    method.prepare(method.parse_params({"scope": "global"}), stream)
    assert len(calls) == 2
    calls.clear()
    assert method.prepare(method.parse_params({"scope": "tensor"}), stream) is None
    assert not calls


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_does_not_fail_on_nan(scope: str) -> None:
    base, deltas = random_model(6, SHAPES)
    deltas[0]["w1"][2, 3] = float("nan")
    got = run("ties", {"scope": scope, "density": 0.5}, base, deltas)
    # the NaN entry is trimmed (it is no magnitude): every tensor, the NaN's own included, is finite
    assert all(np.isfinite(v).all() for v in got.values()), [k for k, v in got.items() if not np.isfinite(v).all()]


# --------------------------------------------------------------------------- streaming threshold


def tricky_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f32 = np.float32
    # 1, 1 + ulp, 1 + 2 ulp, ...: equal high 16 bits, so pass 2 alone tells them apart
    same_high_bits = (f32(1.0) + np.arange(300, dtype=f32) * np.finfo(f32).eps).astype(f32)
    values = {
        "normal": rng.standard_normal(3000),
        "zeros": np.concatenate([np.zeros(500), -np.zeros(300), rng.standard_normal(50)]),
        "equal": np.concatenate([np.full(700, 0.75), np.full(300, -0.75), [1.0, 2.0, 0.5]]),
        "subnormal": np.array([1e-45, -1e-45, 1e-40, -3e-42, 1.17e-38, 0.0, 1e-44] * 20),
        "extreme": np.array([3.4e38, -3.4e38, 1e-30, -1e30, 1e-38, 65504.0, 1e-45, 0.0, 2.0] * 11),
        "same_high_bits": np.concatenate([same_high_bits, -same_high_bits[::3]]),
        "mixed": np.concatenate(
            [rng.standard_normal(400) * 10.0 ** rng.integers(-40, 38, 400), np.zeros(100)]
        ),
    }
    return {name: v.astype(f32) for name, v in values.items()}


def sorted_kth(values: np.ndarray, k: int) -> float:
    return float(torch.sort(torch.from_numpy(values).abs(), descending=True).values[k - 1])


@pytest.mark.parametrize("case", list(tricky_values()))
def test_streaming_kth_largest_equals_sort(case: str) -> None:
    values = tricky_values()[case]
    chunks = [torch.from_numpy(c) for c in np.array_split(values, 5)]
    ks = sorted({1, 2, values.size // 3, values.size // 2, values.size - 1, values.size})
    for k in ks:
        sel = StreamingKthLargest()
        for c in chunks:
            sel.observe_high(c)
        sel.select(k)
        for c in chunks:
            sel.observe_low(c)
        assert sel.result() == sorted_kth(values, k), (case, k)
        # the per-tensor path (ties scope "tensor") selects the same value
        per_tensor = kth_largest_magnitude(torch.from_numpy(values), k)
        assert per_tensor == sorted_kth(values, k), (case, k)


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9, 1.0])
def test_global_thresholds_equal_sort_over_all_tensors(density: float) -> None:
    cases = tricky_values()
    tasks = [
        {n: torch.from_numpy(v) for n, v in cases.items()},
        {n: torch.from_numpy(-np.roll(v, 7) * np.float32(0.5)) for n, v in cases.items()},
    ]
    base = {n: torch.zeros(v.shape) for n, v in cases.items()}
    inputs = inputs_of(base, tasks)
    thresholds = global_thresholds(stream_of(inputs), density)
    for task, threshold in zip(tasks, thresholds):
        values = np.concatenate([v.numpy() for v in task.values()])
        k = floor_density(density, values.size)
        assert threshold == sorted_kth(values, k)


def sampling_stream(inputs: Sequence[TensorInputs], calls: list[str]) -> ShardedStream:
    """A stream that can sample, like the engine's: ``calls`` records each pass."""

    def visit_all(visit: Visitor) -> None:
        calls.append("pass")
        stream_of(inputs)(visit)

    def visit_sample(visit: Visitor, every: int) -> None:
        calls.append("sample")
        stream_of(inputs[::every])(visit)

    return ShardedStream(visit_all, len(inputs[0].deltas), visit_sample=visit_sample)


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("guess", ["sample", "far", "top", "none"])
def test_global_thresholds_with_a_window_equal_sort_and_skip_pass_two(
        density: float, guess: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stream that samples, pass 1 also counts the low bits around the guessed bin:
    the thresholds stay exact whether the guess is right (one full pass) or wrong (two)."""
    gen = torch.Generator().manual_seed(11)
    shapes = {f"t{i}": (40 + 13 * i, 30) for i in range(32)}
    tasks = [{n: torch.randn(sh, generator=gen) * (1 + i % 5) for i, (n, sh) in enumerate(shapes.items())}
             for _ in range(3)]
    base = {n: torch.zeros(sh) for n, sh in shapes.items()}
    inputs = inputs_of(base, tasks)
    if guess == "far":  # a window far below every threshold
        monkeypatch.setattr(ties_mod, "_guess_windows", lambda *a: [(100, 4)] * 3)
    elif guess == "top":  # a window at the top end of the bit patterns, clamped into range
        monkeypatch.setattr(ties_mod, "_guess_windows", lambda *a: [((1 << 16) - 2, 16)] * 3)
    elif guess == "none":  # no guess (an empty sample)
        monkeypatch.setattr(ties_mod, "_guess_windows", lambda *a: [None] * 3)
    calls: list[str] = []
    thresholds = global_thresholds(sampling_stream(inputs, calls), density)
    for task, threshold in zip(tasks, thresholds):
        values = torch.cat([v.reshape(-1) for v in task.values()]).numpy()
        assert threshold == sorted_kth(values, floor_density(density, values.size))
    if guess == "sample":  # tensors of five scales, 2 of 32 sampled: the guess may miss
        assert calls[:2] == ["sample", "pass"] and len(calls) <= 3
    else:
        assert calls == ["pass", "pass"]


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])
def test_a_representative_sample_saves_the_second_pass(density: float) -> None:
    gen = torch.Generator().manual_seed(12)
    shapes = {f"t{i}": (100, 40) for i in range(256)}
    tasks = [{n: torch.randn(sh, generator=gen) * (t + 1) for n, sh in shapes.items()} for t in range(3)]
    inputs = inputs_of({n: torch.zeros(sh) for n, sh in shapes.items()}, tasks)
    calls: list[str] = []
    thresholds = global_thresholds(sampling_stream(inputs, calls), density)
    assert calls == ["sample", "pass"]
    for task, threshold in zip(tasks, thresholds):
        values = torch.cat([v.reshape(-1) for v in task.values()]).numpy()
        assert threshold == sorted_kth(values, floor_density(density, values.size))


def test_streaming_kth_largest_of_nothing_is_none() -> None:
    sel = StreamingKthLargest()
    sel.observe_high(torch.randn(10))
    sel.select(0)
    assert sel.result() is None
    with pytest.raises(ValueError, match="k=11"):
        sel.select(11)


# --------------------------------------------------------------------------- DARE


def test_dare_keeps_about_density_of_entries_rescaled() -> None:
    density, n = 0.3, 40_000
    gen = torch.Generator().manual_seed(11)
    delta = {"x": torch.randn(200, 200, generator=gen)}
    base = {"x": torch.zeros(200, 200)}
    got = run("dare", {"density": density, "seed": 5}, base, [delta])["x"]
    kept = got != 0
    bound = 5 * math.sqrt(density * (1 - density) / n)  # five standard deviations of the share
    assert abs(kept.mean() - density) < bound
    np.testing.assert_allclose(got[kept], delta["x"].double().numpy()[kept] / density, rtol=1e-6)


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_is_deterministic_per_seed(combine: str) -> None:
    base, deltas = random_model(12, SHAPES)
    first = run("dare", {"seed": 1, "combine": combine}, base, deltas)
    again = run("dare", {"seed": 1, "combine": combine}, base, deltas)
    other = run("dare", {"seed": 2, "combine": combine}, base, deltas)
    for n in SHAPES:
        np.testing.assert_array_equal(first[n], again[n])
    assert any(not np.array_equal(first[n], other[n]) for n in SHAPES)


def test_dare_masks_differ_between_tasks_and_tensors() -> None:
    shape = (30, 30)
    base = {"a": torch.zeros(shape), "b": torch.zeros(shape)}
    ones = {"a": torch.ones(shape), "b": torch.ones(shape)}
    # a zero weight silences a task: each run shows one task's masks
    first = run("dare", {"density": 0.5}, base, [ones, ones], weights=[1.0, 0.0])
    second = run("dare", {"density": 0.5}, base, [ones, ones], weights=[0.0, 1.0])
    assert not np.array_equal(first["a"] != 0, second["a"] != 0)
    assert not np.array_equal(first["a"] != 0, first["b"] != 0)


def test_dare_scope_has_no_effect() -> None:
    base, deltas = random_model(13, SHAPES)
    glob = run("dare", {"combine": "ties", "scope": "global"}, base, deltas)
    tens = run("dare", {"combine": "ties", "scope": "tensor"}, base, deltas)
    for n in SHAPES:
        np.testing.assert_array_equal(glob[n], tens[n])


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["ties", "dare"])
@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_outside_zero_one_is_refused(name: str, density: float) -> None:
    with pytest.raises(InputError, match="density"):
        get_method(name).parse_params({"density": density})


@pytest.mark.parametrize("name", ["weight_average", "task_arithmetic", "ties", "dare"])
def test_unknown_parameter_lists_the_valid_ones(name: str) -> None:
    method = get_method(name)
    with pytest.raises(InputError, match="rank_fraction") as err:
        method.parse_params({"rank_fraction": 0.5})
    for field in method.Params.model_fields:
        assert field in str(err.value)


@pytest.mark.parametrize(
    "name,raw,field",
    [
        ("ties", {"sign": "vote"}, "sign"),
        ("ties", {"scope": "layer"}, "scope"),
        ("dare", {"combine": "mean"}, "combine"),
    ],
)
def test_bad_choice_is_refused(name: str, raw: dict, field: str) -> None:
    with pytest.raises(InputError, match=field):
        get_method(name).parse_params(raw)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare"])
def test_negative_and_auto_scale_are_accepted(name: str) -> None:
    method = get_method(name)
    assert method.scale(method.parse_params({"scale": -0.5})) == -0.5
    assert method.scale(method.parse_params({"scale": "auto"})) == "auto"


def test_defaults_follow_the_spec() -> None:
    assert get_method("task_arithmetic").parse_params(None).model_dump() == {"scale": 0.3}
    assert get_method("ties").parse_params(None).model_dump() == {
        "density": 0.2, "scale": 1.0, "sign": "mass", "scope": "global"
    }
    dare = get_method("dare").parse_params(None).model_dump()
    assert dare["density"] == 0.5 and dare["seed"] == 0 and dare["combine"] == "task_arithmetic"
    average = get_method("weight_average")
    assert average.parse_params(None).model_dump() == {}
    assert average.scale(average.parse_params(None)) == 1.0


@pytest.mark.parametrize("name", ["weight_average", "task_arithmetic", "ties", "dare"])
def test_every_parameter_is_described(name: str) -> None:
    method = get_method(name)
    assert method.description and "\n" not in method.description
    for field, info in method.Params.model_fields.items():
        assert info.description, field


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_trim_keeps_exactly_the_magnitudes_at_or_above_the_threshold(dtype: torch.dtype) -> None:
    """The one-pass trim (hardshrink just below the threshold) equals |τ| >= threshold in
    every floating dtype, including entries equal to the threshold and its neighbours."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, generator=g, dtype=torch.float64).to(dtype)
    thr = float(x.abs().sort().values[2500])
    near = torch.nextafter(torch.tensor([thr, thr], dtype=dtype), torch.tensor([0.0, 1e9], dtype=dtype))
    x = torch.cat([x, torch.tensor([thr, -thr], dtype=dtype), near, -near, torch.zeros(2, dtype=dtype)])
    out = ties_mod.trim(x, thr)
    ref = torch.where(x.abs() >= thr, x, torch.zeros_like(x))
    assert out.dtype == dtype and torch.equal(out, ref)
    assert ties_mod.count_kept(out) == int((x.abs() >= thr).sum()) == int(torch.count_nonzero(ref))
    assert torch.equal(ties_mod.trim(x, 0.0), x)  # a zero threshold keeps everything
    assert ties_mod.count_kept(ties_mod.trim(x, None)) == 0
