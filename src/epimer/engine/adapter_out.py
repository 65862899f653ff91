"""A merge written as a PEFT LoRA adapter (``epimer merge --adapter-rank R``; docs/method.md §4b).

The inputs are LoRA adapters on the base. The merged update of each module the adapters
target, ``scale · Δ``, is written as LoRA factors of rank ``R`` from its SVD (float64; the
subspace methods give theirs, ``U⊥ diag(c) V⊥ᵀ``, so none is computed),
``B = U_R √S_R``, ``A = √S_R V_Rᵀ`` with ``lora_alpha = r`` (PEFT's scale 1): exact when R is
at least the rank of Δ; otherwise the best rank-R approximation, whose relative error
``‖Δ − Δ_R‖_F / ‖Δ‖_F`` is reported per module. Tensors the adapters save whole
(``modules_to_save`` copies) are written whole (base + scale · Δ). Every other tensor's merged
update must be exactly zero (no task changed it), or the merge is refused: an adapter could
not hold it. Only one module's dense Δ exists at a time.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from epimer.basis import svd as thin_svd
from epimer.errors import InputError
from epimer.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, AdapterCheckpoint


def lora_factors(delta: torch.Tensor, rank: int, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(B (m, r), A (r, n), relative Frobenius error of B A against Δ, r) for r = min(rank, m, n).

    ``svd``: (U, c, V) with orthonormal U, V and Δ = U diag(c) Vᵀ (a subspace method's own
    form of its update): then no SVD of Δ is computed; c is sorted by magnitude and its signs
    moved into U. An all-zero Δ gives zero factors without an SVD."""
    if not bool(delta.any()):
        m, n = delta.shape
        r = min(rank, m, n)
        return delta.new_zeros(m, r, dtype=torch.float64), delta.new_zeros(r, n, dtype=torch.float64), 0.0, r
    if svd is not None:
        u, c, v = (x.to(torch.float64) for x in svd)
        order = torch.argsort(c.abs(), descending=True)
        u, c, v = u[:, order] * torch.sign(c[order]).where(c[order] != 0, torch.ones_like(c[order])), c[order].abs(), \
            v[:, order]
        s, vh = c, v.T
    else:
        u, s, vh = thin_svd(delta.to(torch.float64))
    r = min(rank, s.numel(), min(delta.shape))
    root = s[:r].sqrt()
    total = float(s.square().sum())
    err = math.sqrt(float(s[r:].square().sum()) / total) if total > 0 else 0.0
    return u[:, :r] * root, root[:, None] * vh[:r], err, r


def write_adapter(run: Any, out: Path, *, rank: int, overwrite: bool = False) -> dict[str, float]:
    """Merge ``run`` (a `MergeRun` over adapter task models) and write OUT as a PEFT LoRA adapter
    folder; returns each module's truncation error."""
    from epimer.engine.output import check_output
    from epimer.io.fisher import write_safetensors
    from epimer.io.outdir import discard_folder, os_error_message, partial_name, publish_folder

    if rank < 1:
        raise InputError(f"--adapter-rank must be at least 1; got {rank}")
    if not run.tasks or not all(isinstance(t, AdapterCheckpoint) for t in run.tasks):
        raise InputError("--adapter-rank writes the merge as a LoRA adapter, which needs every model to be a PEFT LoRA "
                         "adapter on the base; write a full model instead (drop --adapter-rank)")
    if run.group.active:
        raise InputError("--adapter-rank runs as one process; run it without torchrun")
    configs = [t.config for t in run.tasks]
    transpose = {bool(c.get("fan_in_fan_out")) for c in configs}
    if len(transpose) > 1:
        raise InputError("the adapters disagree on fan_in_fan_out; they cannot be written as one adapter")
    fan_in_fan_out = transpose.pop()
    targets = sorted({n for t in run.tasks for n in t.modules})
    whole = sorted({n for t in run.tasks for n in t.whole})
    out = check_output(out, run.config, overwrite)

    state = run.method.prepare(run.params, run.prepare_stream())
    parts: dict[str, list[torch.Tensor]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    deltas: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    terms = []
    auto = run.method.scale(run.params) == "auto"
    for p, _rows, last, res, ab in run.results(state, terms=auto):
        if ab is not None:
            terms.append(ab)
        parts.setdefault(p.name, []).append(res.delta)
        if not last:
            continue
        d = torch.cat(parts.pop(p.name)) if len(parts.get(p.name, [])) > 1 else parts.pop(p.name)[0]
        if p.name in targets:
            svd = res.factors
            if svd is not None and fan_in_fan_out:  # Δᵀ = V diag(c) Uᵀ
                svd = (svd[2], svd[1], svd[0])
            b, a, err, r = lora_factors(d.T if fan_in_fan_out else d, rank, svd)
            factors[p.name] = (b, a, r)
            errors[p.name[: -len(".weight")]] = err
        elif p.name in whole:
            deltas[p.name] = d
        elif bool((d != 0).any()):
            raise InputError(f"tensor {p.name!r}: the merged update is not zero, and no adapter targets it or saves it "
                             "whole, so a LoRA adapter cannot hold it; write a full model (drop --adapter-rank)")
    run.warn_ill_posed()
    scale = run.method.scale(run.params)
    if scale == "auto":
        scale = run.auto_scale(terms)
        run.report.scale_auto = scale
    scale = float(scale)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for name, (b, a, r) in factors.items():
        module = name[: -len(".weight")]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (b * scale).to(torch.float32).contiguous()
        if r != rank:  # a module smaller than R: its own rank, still PEFT scale 1
            rank_pattern[re.escape(module)] = r
            alpha_pattern[re.escape(module)] = r
    for name, d in deltas.items():
        base = run.base.get(name)
        tensors[f"{PREFIX}{name}"] = (base.float() + scale * d).to(base.dtype).contiguous()
    first = configs[0]
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False, "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(n[: -len(".weight")] for n in factors),
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in deltas}) or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "lora_dropout": 0.0,
        "task_type": first.get("task_type"), "base_model_name_or_path": first.get("base_model_name_or_path"),
        "inference_mode": True, "init_lora_weights": True, "use_dora": False,
    }
    try:
        tmp = Path(tempfile.mkdtemp(prefix=partial_name(out), dir=out.parent))
    except OSError as err:
        raise InputError(os_error_message(err, out.parent, "output folder")) from None
    try:
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt", "merged_by": "epimer"}, "merged adapter")
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        worst = max(errors.values(), default=0.0)
        lines = [f"# Merged LoRA adapter ({run.config.method})", "",
                 f"{len(run.tasks)} LoRA adapters merged with `{run.config.method}` (scale {scale:g}) and written at "
                 f"rank {rank}. Truncation error per module, ‖Δ − Δ_r‖_F / ‖Δ‖_F (0: exact), worst {worst:.3g}:", "",
                 "| module | rank | relative error |", "|---|---:|---:|"]
        lines += [f"| `{m}` | {factors[m + '.weight'][2]} | {e:.3g} |" for m, e in sorted(errors.items())]
        (tmp / "README.md").write_text("\n".join(lines) + "\n")
        (tmp / "merge_report.json").write_text(json.dumps({"truncation_error": errors, "scale": scale}, indent=2) + "\n")
        publish_folder(tmp, out, overwrite)
    except BaseException:
        discard_folder(tmp)
        raise
    return errors
