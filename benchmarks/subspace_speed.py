"""Speed and accuracy of the projected metric H_t = Bᵀ diag(vec F_t) B (docs/method.md §3.4).

Part (a): one 768 × 768 layer, T = 8 tasks, k = 96 atoms per task (r = 768). Times the exact
metric against the factored fast path at Fisher ranks 1, 4 and 16 (median of several runs after
a warm-up), and reports each approximation's relative Frobenius error on H (against the exact
H) and on F. The Fisher has the structure of a real linear layer: the outer product of an
output-gradient second moment and an input second moment (the K-FAC picture), times lognormal
noise for everything that picture leaves out (sampling noise, feature correlations); the noise
level is not known in general, so errors are reported for several (``--noise``).

What is timed is checked: entries of the exact H against the defining sum evaluated directly in
float64, exact symmetry, and Fisher errors that fall as the rank grows.

    python benchmarks/subspace_speed.py                # writes docs/_subspace_speed.md
    python benchmarks/subspace_speed.py --repeats 5 --noise 0.1 0.25 0.5 1.0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from epimer.curvature.metric import projected_metric
from epimer.frechet import IDENTITY, Dense, frechet_merge
from epimer.basis import project, tagged_basis

EPS = 1e-6  # the method's default jitter


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def make_layer(m: int, n: int, tasks: int, noises: list[float], seed: int):
    """Task vectors with decaying spectra, and one K-FAC-shaped Fisher per noise level (the same
    moments and the same standard normal draw, scaled), float32."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    decay = 1.0 / torch.arange(1, p + 1, dtype=torch.float32)  # σ_i ∝ 1/i
    deltas = [
        (torch.randn(m, p, generator=g) * decay) @ torch.randn(p, n, generator=g) / p**0.5
        for _ in range(tasks)
    ]
    z = kfac_moments(m, n, g)
    fishers = [z[0] * torch.exp(sigma * z[1]) for sigma in noises]
    return deltas, fishers


def kfac_moments(m: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(outer(E[δ²], E[x²]), standard normal noise draw): heavy-tailed second moments of the
    output gradients and inputs, whose outer product is the K-FAC Fisher of a linear layer."""
    out_moment = torch.exp(torch.randn(m, generator=g))
    in_moment = torch.exp(torch.randn(n, generator=g))
    return torch.outer(out_moment, in_moment), torch.randn(m, n, generator=g)


def check_exact(h: torch.Tensor, fisher: torch.Tensor, u: torch.Tensor, v: torch.Tensor, seed: int) -> float:
    """Largest error of 32 random entries of H against Σ_ij F u_a u_b v_a v_b in float64,
    relative to max |H|; also that H is exactly symmetric."""
    assert torch.equal(h, h.T), "exact H is not symmetric"
    g = torch.Generator().manual_seed(seed)
    r = u.shape[1]
    f, u64, v64 = fisher.double(), u.double(), v.double()
    scale = float(h.abs().max())
    worst = 0.0
    for a, b in torch.randint(0, r, (32, 2), generator=g).tolist():
        direct = float((f * torch.outer(u64[:, a] * u64[:, b], v64[:, a] * v64[:, b])).sum())
        direct += EPS * float(f.mean()) * (a == b)
        worst = max(worst, abs(float(h[a, b]) - direct) / scale)
    return worst


def merge_check(deltas, basis, ranks: list[int], sigma: float, seed: int) -> dict[str, float]:
    """Relative change of the merged Δ (EpiMer defaults otherwise: frechet_sum, projected
    coordinates) when every task's exact metric is replaced by the rank-s one, next to how far
    the exact merge is from TSV-M-like flat aggregation (H_t = I): the approximation error
    against the size of the curvature effect it approximates."""
    g = torch.Generator().manual_seed(seed + 1)
    m, n = deltas[0].shape
    fishers = []
    for _ in deltas:
        kfac, z = kfac_moments(m, n, g)
        fishers.append(kfac * torch.exp(sigma * z))
    weights = torch.full((len(deltas),), 1 / len(deltas), dtype=torch.float64)
    coords = [project(basis.u, basis.v, tau).double() for tau in deltas]

    def merged(rank) -> torch.Tensor:
        metrics = (projected_metric(f, basis.u, basis.v, EPS, rank).h for f in fishers)
        return frechet_merge(coords, Dense(list(metrics)), weights, "frechet_sum")

    exact = merged("exact")
    out = {"flat (H_t = I)": rel(frechet_merge(coords, IDENTITY, weights, "frechet_sum"), exact)}
    out.update({f"fisher_rank {rank}": rel(merged(rank), exact) for rank in ranks})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=768)
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                        help="σ of the lognormal noise on F; timings use the first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--merge-check", action=argparse.BooleanOptionalAction, default=True,
                        help="also merge T tasks with exact and rank-s metrics (T more exact metrics)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/_subspace_speed.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    deltas, fishers = make_layer(args.m, args.n, args.tasks, args.noise, args.seed)
    basis = tagged_basis(deltas, 1.0)
    u, v = basis.u, basis.v

    # Accuracy, for every noise level: exact H checked against its definition, then each rank.
    errors: dict[int, list[tuple[float, float]]] = {rank: [] for rank in args.ranks}
    spot = 0.0
    for fisher in fishers:
        exact = projected_metric(fisher, u, v, EPS, "exact")
        spot = max(spot, check_exact(exact.h, fisher, u, v, args.seed))
        for rank in args.ranks:
            approx = projected_metric(fisher, u, v, EPS, rank)
            errors[rank].append((rel(approx.h, exact.h), approx.fisher_rel_err))
    assert spot < 1e-4, f"exact H disagrees with its definition: {spot:.2e}"
    for i in range(len(fishers)):
        f_err = [errors[rank][i][1] for rank in args.ranks]
        assert all(a >= b - 1e-6 for a, b in zip(f_err, f_err[1:])), f"F error not falling: {f_err}"
        assert all(0 <= errors[rank][i][0] < 1 for rank in args.ranks), "factored H error out of range"

    # Speed, on the first Fisher (the cost does not depend on its values). The fast paths take
    # a fraction of a second: more runs steady their median on a shared machine.
    fisher = fishers[0]
    load_before = os.getloadavg()[0]
    t_exact = median_seconds(lambda: projected_metric(fisher, u, v, EPS, "exact"), args.repeats)
    times = {
        rank: median_seconds(lambda: projected_metric(fisher, u, v, EPS, rank), 5 * args.repeats)
        for rank in args.ranks
    }
    load_after = os.getloadavg()[0]

    merge = merge_check(deltas, basis, args.ranks, max(args.noise), args.seed) if args.merge_check else {}

    header = (
        f"Projected metric, one {args.m} × {args.n} layer, T = {args.tasks}, k = {basis.k}, "
        f"r = {basis.rank}; Fisher = outer(output moment, input moment) × lognormal(σ) noise. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores "
        f"(1-min load average {load_before:.1f} before timing, {load_after:.1f} after); median of "
        f"{args.repeats} runs (exact) or {5 * args.repeats} (factored) after a warm-up. Exact H checked entrywise against its definition in float64 "
        f"(largest error {spot:.1e} of max |H|). Errors are relative Frobenius errors."
    )
    noise_cols = "".join(f" H err, σ={s} | F err, σ={s} |" for s in args.noise)
    lines = [
        f"| metric | median time (s) | speed-up vs exact |{noise_cols}",
        "|---|---:|---:|" + "---:|---:|" * len(args.noise),
        f"| exact | {t_exact:.3f} | 1.0× |" + " 0 | 0 |" * len(args.noise),
    ]
    for rank in args.ranks:
        cells = "".join(f" {h:.1e} | {f:.1e} |" for h, f in errors[rank])
        lines.append(f"| fisher_rank {rank} | {times[rank]:.3f} | {t_exact / times[rank]:.1f}× |{cells}")
    verdicts = []
    if 4 in times:
        for sigma, (h_err, _) in zip(args.noise, errors[4]):
            met = t_exact / times[4] >= 20 and h_err < 1e-2
            verdicts.append(f"σ={sigma}: {'met' if met else 'NOT met'} ({t_exact / times[4]:.0f}×, {h_err:.1e})")
    verdict = (
        "Target (fisher_rank 4 at least 20× faster than exact, error of H below 1e-2): "
        + "; ".join(verdicts) + "."
    ) if verdicts else ""
    merge_lines = []
    if merge:
        merge_lines = [
            f"Merged Δ of {args.tasks} tasks (each its own Fisher, σ = {max(args.noise)}; "
            "frechet_sum, projected coordinates), relative difference from the merge with exact "
            "metrics:",
            "",
            "| metrics | rel. difference of Δ |",
            "|---|---:|",
            *(f"| {name} | {err:.1e} |" for name, err in merge.items()),
            "",
        ]
    command = "python benchmarks/subspace_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, val)) if isinstance(val, list) else val}"
        for k, val in vars(args).items()
        if val is not None and k not in ("out", "merge_check")
    )
    text = "\n".join([header, "", *lines, "", verdict, "", *merge_lines, f"Command: `{command}`", ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
