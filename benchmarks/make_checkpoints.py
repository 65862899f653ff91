"""Random LLM-shaped checkpoints for the speed and memory benchmarks (no download).

Tensor names and shapes come from a transformers ``LlamaConfig`` built on the meta device;
values are drawn per tensor from a generator seeded by the tensor's name, so the base and
each task model are written one tensor at a time without holding a model in memory. Task
models are the base plus small Gaussian noise (std 1e-3, 5% of a weight's; bf16 resolves it). Output:
safetensors shards (bf16, or ``--dtype float32``) of at most ``--shard-size`` bytes plus an index, and ``config.json``.

Reference shape (the default): hidden 2048, intermediate 5632, 16 layers, 32 heads, 4
key-value heads, vocabulary 32000, untied embeddings: 836M parameters.

    python benchmarks/make_checkpoints.py --out /tmp/llm836m --tasks 3
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import torch

from epimer.io.writer import CheckpointWriter, PlannedTensor


def llama_shapes(args: argparse.Namespace) -> tuple[dict[str, tuple[int, ...]], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         tie_word_embeddings=False, torch_dtype=args.dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    meta = config.to_dict()
    meta["architectures"] = ["LlamaForCausalLM"]  # what loaders (and mergekit) dispatch on
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}, meta


def tensor_for(name: str, shape: tuple[int, ...], model_index: int,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 1:  # norms: around 1
        base = 1.0 + 0.02 * torch.randn(shape, generator=g)
    else:
        base = torch.randn(shape, generator=g).mul_(0.02)
    if model_index > 0:
        g.manual_seed(zlib.crc32(name.encode()) + 7919 * model_index)
        base.add_(torch.randn(shape, generator=g), alpha=1e-3)
    return base.to(dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-size", type=int, default=10**9)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)

    shapes, config = llama_shapes(args)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{len(shapes)} tensors, {n_params / 1e6:.0f}M parameters")
    plan = [PlannedTensor(n, s, dtype) for n, s in shapes.items()]
    for i, label in enumerate(["base"] + [f"task_{t}" for t in range(args.tasks)]):
        folder = args.out / label
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        w = CheckpointWriter(folder, plan, shard_size=args.shard_size)
        for n, s in shapes.items():
            w.write(n, tensor_for(n, s, i, dtype))
        w.close()
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        print(f"{label}: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
