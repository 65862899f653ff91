"""GPU check of ``--device cuda``: the same merges on the CPU and on the GPU, compared and timed.

A Llama-shaped base (by default the 836M layout of `make_checkpoints.py`: hidden 2048,
intermediate 5632, 8 query / 2 key-value head groups of 256, vocabulary 32000; ``--layers`` of
its 22 blocks, 4 by default so that the CPU side fits the budget) and three task models with
synthetic Fishers are made in memory, then merged with `merge_state_dicts` for tsv_m, epimer
(rank_fraction 0.25 by default, fisher_rank 4) and tsv_m with ``svd: randomized``, once with ``device="cpu"`` and once with
``device="cuda"`` (plus one untimed warm-up on the GPU). Printed: wall time of each, the
ratio, and the largest relative difference between the CPU and GPU merges over every tensor
(float32 SVDs on different hardware agree to about 1e-5 of the update's scale, not bit for
bit). Prepared to run in one call of a few minutes on a machine with a CUDA build of torch:

    python benchmarks/device_check.py --layers 4 --threads 16

``--device cpu`` runs the same script with the CPU on both sides (a dry run: the test suite runs
it on tiny shapes, so the script is known to work before a GPU session spends its time on it).
"""

from __future__ import annotations

import argparse
import time

import torch


def checkpoints(layers: int, hidden: int, inter: int, kv: int, vocab: int, tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,)})
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    models, fishers = [], []
    for _ in range(tasks):
        models.append({k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        fishers.append({k: torch.rand(v.shape, generator=g) ** 4 + 1e-6 for k, v in base.items()})
    return base, models, fishers


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    from epimer.engine import merge_state_dicts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rank-fraction", type=float, default=0.25)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="the side compared with the CPU (cpu: a dry run of the script)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU and a CUDA build of torch (--device cpu: a dry run)")
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU on both sides (dry run)"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} CPU threads")
    base, models, fishers = checkpoints(args.layers, args.hidden, args.inter, args.kv, args.vocab, 3)
    params = {"rank_fraction": args.rank_fraction}
    merge_state_dicts(base, models, "tsv_m", params, device=dev)  # warm-up: CUDA context, kernels
    print("| method | CPU s | GPU s | CPU / GPU | max relative difference |\n|---|---:|---:|---:|---:|")
    variants = {"tsv_m": ("tsv_m", params), "epimer": ("epimer", params),
                # the sketch is drawn on the CPU and moved to the device, so both sides take the same one
                "tsv_m, svd: randomized": ("tsv_m", {**params, "svd": "randomized"})}
    rows = {}
    for label, (method, raw) in variants.items():
        times, merged = {}, {}
        for side, device in (("gpu", dev), ("cpu", "cpu")):
            start = time.perf_counter()
            merged[side] = merge_state_dicts(base, models, method, raw, fishers=fishers, device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            times[side] = time.perf_counter() - start
        diff = max(float((merged["gpu"][k] - merged["cpu"][k]).abs().max())
                   / max(float((merged["cpu"][k] - base[k]).abs().max()), 1e-30) for k in base)
        rows[label] = (times["cpu"], times["gpu"], diff)
        print(f"| {label} | {times['cpu']:.1f} | {times['gpu']:.1f} | {times['cpu'] / times['gpu']:.1f} | "
              f"{diff:.2e} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
