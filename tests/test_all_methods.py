"""Every registered method through the common checks, via the engine's in-memory API."""

from __future__ import annotations

import pytest
import torch

from epimer.engine import merge_state_dicts
from epimer.registry import available_methods, get_method
from tests.conftest import random_models

METHODS = available_methods()


def _fishers(tasks: list[dict[str, torch.Tensor]], seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.rand(v.shape, generator=g) + 0.1 for n, v in t.items() if v.is_floating_point()}
            for t in tasks]


def _merge(base, tasks, method, fishers, parameters=None, **kw):
    needs = get_method(method).needs_fisher
    return merge_state_dicts(base, tasks, method, parameters, fishers=fishers if needs else None, **kw)


def test_the_registry_holds_every_spec_method() -> None:
    assert set(METHODS) == {"weight_average", "task_arithmetic", "ties", "dare", "fisher_average",
                            "tsv_m", "iso_c", "iso_cts", "epimer"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_and_dtype_kept(method: str, dtype: torch.dtype) -> None:
    base, tasks = random_models(3, seed=11, dtype=dtype)
    out = _merge(base, tasks, method, _fishers(tasks))
    assert set(out) == set(base)
    for n, v in out.items():
        assert v.dtype == base[n].dtype and v.shape == base[n].shape, n
        if v.is_floating_point():
            assert torch.isfinite(v).all(), n
        else:
            assert torch.equal(v, base[n]), n


@pytest.mark.parametrize("method", METHODS)
def test_zero_task_vectors_give_the_base(method: str) -> None:
    base, _ = random_models(3, seed=12)
    tasks = [{n: v.clone() for n, v in base.items()} for _ in range(3)]
    out = _merge(base, tasks, method, _fishers(tasks))
    for n, v in out.items():
        torch.testing.assert_close(v, base[n], rtol=0, atol=1e-6, msg=f"{method}: {n}")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dare"])  # DARE's masks follow task positions
def test_task_order_invariance(method: str) -> None:
    base, tasks = random_models(3, seed=13)
    fishers = _fishers(tasks)
    a = _merge(base, tasks, method, fishers)
    b = _merge(base, tasks[::-1], method, fishers[::-1])
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5, msg=f"{method}: {n}")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "weight_average"])
def test_scale_is_linear_in_the_update(method: str) -> None:
    """θ = θ0 + scale·Δ: the update at scale 0.5 is half the update at scale 1."""
    base, tasks = random_models(2, seed=14)
    fishers = _fishers(tasks)
    one = _merge(base, tasks, method, fishers, parameters={"scale": 1.0})
    half = _merge(base, tasks, method, fishers, parameters={"scale": 0.5})
    for n, b in base.items():
        if b.is_floating_point():
            torch.testing.assert_close(half[n] - b, 0.5 * (one[n] - b), rtol=1e-4, atol=1e-5, msg=n)
