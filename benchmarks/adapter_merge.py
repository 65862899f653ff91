"""LoRA adapters merged as adapters against the same merges of the full models they stand for.

Writes a Llama-shaped base (float32 safetensors), T rank-r LoRA adapters on every attention and
MLP projection (PEFT's file layout), the T full task models ``base + (B A)·s`` and a diagonal
Fisher file per task; then times whole ``epimer merge`` processes (wall time and peak resident
memory of each process, from ``wait4``), interleaved over the repeats, for TSV-M and EpiMer:

- adapters in, adapter out (``--adapter-rank``): per-task SVDs from the factors;
- adapters in, full model out;
- full models in, full model out (the dense path).

rank_fraction is set so that each task keeps at most r directions on every projection (k = r
on the widest: the merge is well posed on LoRA updates, docs/method.md §4b), and the adapter
output has rank T·r, which holds the merged update exactly. The adapter and dense merges are
checked to agree.

    python benchmarks/adapter_merge.py --work /tmp/adapters --hidden 2048 --layers 16 --inter 5632
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from _timing import run_timed  # a sibling script (this folder is on sys.path)

PROJ = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("kv", "h"), "self_attn.v_proj": ("kv", "h"),
        "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
        "mlp.down_proj": ("h", "i")}


def build(work: Path, hidden: int, layers: int, inter: int, vocab: int, tasks: int, rank: int) -> None:
    from epimer.fingerprint import combine, tensor_blocks
    from epimer.io.fisher import save_fisher, tensor_fingerprints

    if (work / "done").exists():
        return
    g = torch.Generator().manual_seed(0)
    dims = {"h": hidden, "kv": hidden // 4, "i": inter}
    base = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
            "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    for i in range(layers):
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        base[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
        for proj, (o, n) in PROJ.items():
            base[f"model.layers.{i}.{proj}.weight"] = torch.randn(dims[o], dims[n], generator=g) * 0.02
    (work / "base").mkdir(parents=True, exist_ok=True)
    save_file(base, str(work / "base" / "model.safetensors"))
    for t in range(tasks):
        ad, full = {}, dict(base)
        for i in range(layers):
            for proj, (o, n) in PROJ.items():
                a = torch.randn(rank, dims[n], generator=g) / dims[n] ** 0.5
                b = torch.randn(dims[o], rank, generator=g) * 0.01
                key = f"base_model.model.model.layers.{i}.{proj}"
                ad[f"{key}.lora_A.weight"], ad[f"{key}.lora_B.weight"] = a, b
                name = f"model.layers.{i}.{proj}.weight"
                full[name] = base[name] + (b @ a) * (2 * rank / rank)
        folder = work / f"adapter_{t}"
        folder.mkdir(exist_ok=True)
        save_file(ad, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [p.split(".")[1] for p in PROJ],
            "bias": "none", "use_dora": False}))
        (work / f"full_{t}").mkdir(exist_ok=True)
        save_file(full, str(work / f"full_{t}" / "model.safetensors"))
        fisher = {n: torch.rand(v.shape, generator=g) + 0.1 for n, v in full.items()}
        shapes = {n: tuple(v.shape) for n, v in full.items()}
        per = tensor_fingerprints(fisher, shapes.__getitem__, tensor_blocks(full))
        save_fisher(work / f"fisher_{t}.safetensors", fisher, num_samples=64, estimator="empirical", seed=0,
                    fraction=1.0, model_fingerprint=combine(per), tensor_fingerprints=per)
        del full, fisher
    (work / "done").write_text("")


def agreement(work: Path, method: str) -> float:
    """Largest difference between the adapter-path merges (full and adapter output) and the
    dense one, relative to the dense merged update."""
    from epimer.io.adapter import AdapterCheckpoint
    from epimer.io.reader import open_checkpoint

    base = open_checkpoint(work / "base")
    dense = open_checkpoint(work / f"out_{method}_full_full")
    full = open_checkpoint(work / f"out_{method}_adapter_full")
    adapter = AdapterCheckpoint(work / f"out_{method}_adapter_ad", base)
    worst = 0.0
    for n in base.names():
        if ".layers." not in n or not n.endswith("proj.weight"):
            continue
        want = dense.get(n) - base.get(n)
        scale = float(want.abs().max()) or 1.0
        worst = max(worst, float((full.get(n) - dense.get(n)).abs().max()) / scale,
                    float((adapter.delta(n) - want).abs().max()) / scale)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:
        build(args.work, args.hidden, args.layers, args.inter, args.vocab, args.tasks, args.rank)
        return 0
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    # Built in a child process: each merge is forked from this one, and a child's peak resident
    # memory (wait4's ru_maxrss) keeps the pages of the process it was forked from until exec,
    # so this process must stay small for the figures to be the merges' own.
    subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--build-only"],
                   check=True)
    build_s = time.perf_counter() - t0
    # k = rank·(min(m, n) / hidden) <= rank on every projection: the merge is well posed
    rf = args.rank * args.tasks / args.hidden
    epimer = [sys.executable, "-m", "epimer.cli"]
    cases = {}
    for method, params in (("tsv_m", {"rank_fraction": rf}), ("epimer", {"rank_fraction": rf})):
        for kind in ("adapter", "full"):
            models = [{"model": f"{kind}_{t}", **({"fisher": f"fisher_{t}.safetensors"} if method == "epimer" else {})}
                      for t in range(args.tasks)]
            cfg = args.work / f"{method}_{kind}.yaml"
            import yaml

            cfg.write_text(yaml.safe_dump({"base_model": "base", "models": models, "method": method,
                                           "parameters": params}))
            # the merged update has rank up to T·k: an adapter of that rank holds it exactly
            outs = [("adapter in, adapter out", ["--adapter-rank", str(args.tasks * args.rank)]),
                    ("adapter in, full out", [])] \
                if kind == "adapter" else [("full in, full out (dense)", [])]
            for label, extra in outs:
                out = args.work / f"out_{method}_{kind}_{'ad' if extra else 'full'}"
                cases[(method, label)] = [*epimer, "merge", str(cfg), "-o", str(out), "-q", "--overwrite",
                                          "--threads", str(args.threads), *extra]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for key, cmd in cases.items():
            use = run_timed(cmd, {**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            results[key].append((use.wall, use.peak_kb / 1024 / 1024))  # GiB, as in docs/_adapter_merge_1b.md
            print(key, results[key][-1], file=sys.stderr)
    lines = ["# LoRA adapters: adapter-in/adapter-out against the dense path", "",
             f"Command: `python benchmarks/adapter_merge.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Layout: Llama-shaped, hidden {args.hidden}, {args.layers} layers, MLP {args.inter}, vocabulary "
             f"{args.vocab}; {args.tasks} rank-{args.rank} adapters on the 7 projections of every layer; "
             f"rank_fraction {rf:g} (k <= {args.rank} on every projection), adapter output rank "
             f"{args.tasks * args.rank}. torch {torch.__version__}, "
             f"{args.threads} threads, {platform.machine()}, load average before the run {load}; set-up "
             f"{build_s:.0f} s. Medians of {args.repeats} whole `epimer merge` processes each.", "",
             "| method | path | wall s | peak memory GB |", "|---|---|---:|---:|"]
    for (method, label), rs in results.items():
        lines.append(f"| {method} | {label} | {statistics.median(r[0] for r in rs):.1f} | "
                     f"{statistics.median(r[1] for r in rs):.2f} |")
    lines += ["", "Agreement (max |difference| / max |dense merged update| over the merged tensors):", ""]
    lines += [f"- {m}: {agreement(args.work, m):.2e}" for m in ("tsv_m", "epimer")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
