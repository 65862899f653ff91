"""Speed of Fisher estimation against a plain training step, on a MiniLM-sized BERT.

Samples per second of :func:`epimer.curvature.fisher.fisher_sums` (per-sample gradients with
``torch.func``, squared and summed, over every parameter, embeddings included) against one
training step (forward + backward of the batch loss, no optimizer) on the same batch:
a 6-layer, 384-wide BERT sequence classifier (random init, 2 labels), sequence length 64,
batch 32. Measurements are interleaved (each repeat runs every variant once) so that a change
in machine load hits all of them alike; medians over the repeats, after a warm-up.

Before timing, the Fisher of two samples is checked against a per-sample autograd loop.

    python benchmarks/fisher_speed.py --out docs/_fisher_speed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def build_model(attn: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # MiniLM-L6-H384's shape: 22.7M parameters, 11.7M of them the word embeddings.
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     num_labels=2, attn_implementation=attn)
    return BertForSequenceClassification(cfg)


def make_batch(batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def check_against_loop(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Max relative error of the Fisher of 2 samples (both embedding paths) against a per-sample
    autograd loop."""
    from epimer.curvature.fisher import estimate_fisher, sequence_classification_loss

    two = {k: v[:2] for k, v in batch.items()}
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i in range(2):
        inputs = {k: v[i : i + 1] for k, v in two.items() if k != "labels"}
        loss = F.cross_entropy(model(**inputs).logits, two["labels"][i : i + 1])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            want[n] += g.square() / 2
    # The key biases have an exactly zero gradient (softmax ignores a constant shift), so their
    # entries are rounding noise: errors are relative to each tensor's scale plus a floor.
    floor = 1e-6 * max(float(w.abs().max()) for w in want.values())
    worst = 0.0
    for sparse in (True, False):
        got = estimate_fisher(model, [two], sequence_classification_loss, sparse_embeddings=sparse)
        for n in params:
            worst = max(worst, float((got[n] - want[n]).abs().max()) / (float(want[n].abs().max()) + floor))
    if worst > 1e-3:
        raise AssertionError(f"vmap Fisher differs from the per-sample loop: max relative error {worst:.2e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-sizes", default="8,16,32", help="comma-separated Fisher chunk sizes")
    parser.add_argument("--dense-chunk-size", type=int, default=8,
                        help="chunk size of the dense-embedding variant (0: skip it)")
    parser.add_argument("--projected", default="1.0,0.25",
                        help="comma-separated rank_fractions of the projected-metric variants (every encoder "
                             "matrix gets a random orthonormal basis of r = rank_fraction·min(m, n); empty: skip)")
    parser.add_argument("--vmap-linear", action="store_true",
                        help="also run each projected variant with linear layers through vmap (the path before "
                             "linear probes: dense per-sample gradients, then projected)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    args = parser.parse_args(argv)

    from epimer.curvature.fisher import fisher_sums, sequence_classification_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    model = build_model("eager")
    batch = make_batch(args.batch, args.length, model.config.vocab_size)
    rel_err = check_against_loop(model, batch)
    sdpa = build_model("sdpa")  # the same weights (same seed): what a training run would use

    def train_step(m: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            m.zero_grad(set_to_none=True)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            F.cross_entropy(m(**inputs).logits, batch["labels"]).backward()

        return step

    def fisher(chunk: int, sparse: bool = True) -> Callable[[], None]:
        def run() -> None:
            fisher_sums(model, [batch], sequence_classification_loss, chunk_size=chunk, sparse_embeddings=sparse)

        return run

    model.train()
    sdpa.train()
    variants: dict[str, Callable[[], None]] = {
        "training step, SDPA attention": train_step(sdpa),
        "training step, eager attention": train_step(model),
    }
    for c in (int(x) for x in args.chunk_sizes.split(",")):
        variants[f"Fisher, chunk_size={c}"] = fisher(c)
    def projected(chunk: int, rank_fraction: float, probes: bool = True) -> Callable[[], None]:
        from epimer.basis import polar

        g = torch.Generator().manual_seed(1)
        bases = {}
        for n, p in model.named_parameters():
            if p.dim() == 2 and ".encoder." in f".{n}":
                r = max(1, int(rank_fraction * min(p.shape)))
                bases[n] = (polar(torch.randn(p.shape[0], r, generator=g)), polar(torch.randn(p.shape[1], r, generator=g)))

        def run() -> None:
            fisher_sums(model, [batch], sequence_classification_loss, chunk_size=chunk, bases=bases,
                        linear_probes=probes)

        return run

    for rf in (float(x) for x in args.projected.split(",") if x):
        variants[f"Fisher + projected metrics (rank_fraction {rf:g}), chunk_size=8"] = projected(8, rf)
        if args.vmap_linear:
            variants[f"Fisher + projected metrics (rank_fraction {rf:g}), chunk_size=8, linear layers through vmap"] = \
                projected(8, rf, probes=False)
    if args.dense_chunk_size:
        # Reference point: every parameter through vmap, embeddings as dense per-sample gradients.
        variants[f"Fisher, chunk_size={args.dense_chunk_size}, dense embeddings"] = fisher(args.dense_chunk_size, False)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r >= args.warmup:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    train = min((k for k in variants if k.startswith("training")), key=med.__getitem__)
    fisher_name = min((k for k in variants if k.startswith("Fisher") and "dense" not in k and "projected" not in k),
                      key=med.__getitem__)
    # On a shared machine the load drifts; a ratio of the two runs of one repeat (seconds apart)
    # is steadier than a ratio of medians, and CPU time ignores time spent descheduled.
    paired = statistics.median(t / f for t, f in zip(wall[train], wall[fisher_name]))
    by_cpu = statistics.median(cpu[train]) / statistics.median(cpu[fisher_name])

    n_params = sum(p.numel() for p in model.parameters())
    cmd = "python benchmarks/fisher_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Fisher estimation speed",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
        f"({platform.processor() or 'unknown CPU'}), Python {platform.python_version()}, "
        f"load average before the run {load_before}.",
        "",
        f"Model: BERT 6 layers x 384 (MiniLM-sized), {n_params / 1e6:.1f}M parameters, all of them in the "
        f"Fisher; sequence length {args.length}, batch {args.batch}; medians of {args.repeats} interleaved "
        f"repeats after {args.warmup} warm-up. The Fisher runs in eval mode with eager attention, the "
        f"training step (forward + backward, no optimizer) in train mode. Fisher vs a per-sample autograd "
        f"loop (2 samples, both embedding paths): max relative error {rel_err:.1e}. By default the "
        f"embedding weights take the exact row-wise path; \"dense embeddings\" runs them through vmap "
        f"as well (a (vocab, dim) gradient per sample). The machine is shared: other jobs' load makes "
        f"single runs several times slower at times, hence the minimum beside the median.",
        "",
        "| variant | median wall s / batch | min wall s / batch | samples/s (median wall) | median CPU s / batch |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in variants:
        lines.append(f"| {name} | {med[name]:.3f} | {min(wall[name]):.3f} | {args.batch / med[name]:.1f} | "
                     f"{statistics.median(cpu[name]):.3f} |")
    lines += [
        "",
        f"Ratio of samples/s, {fisher_name!r} / {train!r} (target >= 0.25): "
        f"**{paired:.2f}** (median of per-repeat ratios, wall time); {by_cpu:.2f} by CPU time.",
        "",
    ]
    for name in (k for k in variants if "projected" in k):
        ratio = statistics.median(t / f for t, f in zip(wall[train], wall[name]))
        lines.append(f"Ratio of samples/s, {name!r} / {train!r} (target >= 0.5): **{ratio:.2f}**.")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
