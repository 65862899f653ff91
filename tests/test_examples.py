"""The runnable examples of README run, and what they print is what the maths says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_module_example(capsys) -> None:
    example = _load("custom_module")
    merged = example.main()
    assert "task 0: merged model accuracy" in capsys.readouterr().out
    # Rebuild the example's inputs: every merged matrix update lies in the span of its tagged
    # basis (U diag(c) Vᵀ), and the merge changed every tensor.
    torch.manual_seed(0)
    base = example.BagClassifier()
    data = [example.task_data(s) for s in (1, 2)]
    tasks = [example.fine_tune(base, d) for d in data]
    from epimer.engine import bases_of_state_dicts

    base_sd = {k: v.detach() for k, v in base.state_dict().items()}
    bases = bases_of_state_dicts(base_sd, [{k: v.detach() for k, v in m.state_dict().items()} for m in tasks], 0.5)
    assert set(bases.names) == {"emb.weight", "mix", "head.weight"}
    for name in bases.names:
        b = bases.get(name)
        delta = (merged[name] - base_sd[name]).double()
        u, v = b.u.double(), b.v.double()
        inside = u @ (u.T @ delta @ v) @ v.T
        assert torch.linalg.norm(delta - inside) <= 1e-5 * torch.linalg.norm(delta), name
        assert torch.linalg.norm(delta) > 0, name
