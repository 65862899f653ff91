"""docs/contributing.md's worked example runs: its method registers, merges, and its tests pass."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from epimer import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def example_method():
    """The documented method, registered for the test and removed afterwards."""
    module = types.ModuleType("magnitude_average_example")
    exec(compile(_blocks()[0], str(DOC), "exec"), module.__dict__)  # noqa: S102 - our own documentation
    yield module
    registry._METHODS.pop("magnitude_average", None)


def test_the_docs_hold_the_method_and_its_tests() -> None:
    blocks = _blocks()
    assert len(blocks) == 2
    assert "@register" in blocks[0] and "def test_" in blocks[1]


def test_the_documented_method_and_its_tests(example_method) -> None:
    assert "magnitude_average" in registry.available_methods()
    tests: dict = {}
    exec(compile(_blocks()[1], str(DOC), "exec"), tests)  # noqa: S102
    names = [n for n in tests if n.startswith("test_")]
    assert len(names) == 2
    for n in names:
        tests[n]()


def test_the_documented_method_passes_the_common_checks(example_method) -> None:
    import torch

    from tests import test_all_methods as common

    for dtype in (torch.float32, torch.bfloat16):
        common.test_finite_and_dtype_kept("magnitude_average", dtype)
    common.test_zero_task_vectors_give_the_base("magnitude_average")
    common.test_task_order_invariance("magnitude_average")
    common.test_scale_is_linear_in_the_update("magnitude_average")
