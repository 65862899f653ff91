"""Fisher throughput of the model families of `epimer fisher --task` against a training step.

For each model: samples per second of the Fisher pass (`fisher_sums` with the family's
per-sample loss, every parameter, embeddings on their row path, linear layers probed) and of a
plain training step (forward + backward of the batch's mean loss, no optimizer) on the same
batch; interleaved repeats, medians, and the median of the per-repeat ratios. Models are
random-initialised from transformers configs (no download):

- ``llama-tiny``: 2 layers, hidden 64, vocabulary 1000 (0.3M parameters);
- ``llama-25m``: 6 layers, hidden 384, 6 heads / 2 KV heads, MLP 1024, vocabulary 16000
  (the 20M+ causal LM);
- ``vit-22m``: ViT, 12 layers x 384 (the image-classifier family at 22M);
- ``clip-vit``: a CLIP whose image tower is 6 layers x 384, under a 10-class zero-shot head.

    python benchmarks/fisher_families.py --threads 1 --out docs/_fisher_families.md
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


def llama(hidden: int, layers: int, heads: int, kv: int, mlp: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=mlp, max_position_embeddings=512,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def causal_case(name: str, model: torch.nn.Module, batch: int, length: int) -> dict:
    from epimer.curvature.causal_lm import IGNORE, Tokenized, batches, causal_lm_loss

    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    samples = []
    for i in range(batch):  # prompt of a quarter of the tokens, completion the rest; lengths vary
        n = length - (i % 4) * 4
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 4) + ids[n // 4:]
        samples.append(Tokenized(tuple(ids), tuple(labels)))
    data = next(batches(samples, batch, 0))

    def train() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=data["input_ids"]).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data["labels"][:, 1:].reshape(-1),
                        ignore_index=IGNORE).backward()

    return {"name": name, "model": model, "batch": data, "loss": causal_lm_loss, "train": train,
            "shape": f"batch {batch} x up to {length} tokens, loss on 3/4 of them"}


def vit_case(batch: int) -> dict:
    from transformers import ViTConfig, ViTForImageClassification

    from epimer.curvature.fisher import sequence_classification_loss

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536, num_labels=10, attn_implementation="eager")
    model = ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(2)
    data = {"pixel_values": torch.randn(batch, 3, 224, 224, generator=g), "labels": torch.randint(0, 10, (batch,), generator=g)}

    def train() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(pixel_values=data["pixel_values"]).logits, data["labels"]).backward()

    return {"name": "vit-22m", "model": model, "batch": data, "loss": sequence_classification_loss, "train": train,
            "shape": f"batch {batch} images 224x224"}


def clip_case(batch: int) -> dict:
    from transformers import CLIPConfig, CLIPModel

    from epimer.curvature.fisher import cross_entropy_loss
    from epimer.curvature.vision import CLIPZeroShot

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
                     vision_config=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                        intermediate_size=1536, image_size=224, patch_size=32), projection_dim=256)
    cfg._attn_implementation = cfg.vision_config._attn_implementation = cfg.text_config._attn_implementation = "eager"
    clip = CLIPModel(cfg)
    head = F.normalize(torch.randn(10, 256, generator=torch.Generator().manual_seed(3)), dim=-1)
    model = CLIPZeroShot(clip.vision_model, clip.visual_projection, head, float(clip.logit_scale.detach()))
    g = torch.Generator().manual_seed(2)
    data = {"input": torch.randn(batch, 3, 224, 224, generator=g), "labels": torch.randint(0, 10, (batch,), generator=g)}

    def loss(forward, sample):  # cross_entropy_loss passes the sample's non-label tensors as keywords
        return cross_entropy_loss(lambda input: forward(pixel_values=input), sample)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(pixel_values=data["input"]), data["labels"]).backward()

    return {"name": "clip-vit", "model": model, "batch": data, "loss": loss, "train": train,
            "shape": f"batch {batch} images 224x224 (patch 32), 10 classes"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="llama-tiny,llama-25m,vit-22m,clip-vit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from epimer.curvature.fisher import fisher_sums

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    builders: dict[str, Callable[[], dict]] = {
        "llama-tiny": lambda: causal_case("llama-tiny", llama(64, 2, 4, 2, 128, 1000), 16, 64),
        "llama-25m": lambda: causal_case("llama-25m", llama(384, 6, 6, 2, 1024, 16000), 16, 64),
        "vit-22m": lambda: vit_case(16),
        "clip-vit": lambda: clip_case(16),
    }
    rows = []
    for name in args.cases.split(","):
        case = builders[name]()
        model, batch = case["model"], case["batch"]
        size = len(next(iter(batch.values())))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def fisher() -> None:
            fisher_sums(model, [batch], case["loss"], chunk_size=args.chunk_size)

        model.train()
        wall: dict[str, list[float]] = {"train": [], "fisher": []}
        for r in range(args.warmup + args.repeats):
            for key, fn in (("train", case["train"]), ("fisher", fisher)):
                t0 = time.perf_counter()
                fn()
                if r >= args.warmup:
                    wall[key].append(time.perf_counter() - t0)
        ratio = statistics.median(t / f for t, f in zip(wall["train"], wall["fisher"]))
        rows.append((name, n_params, case["shape"], size / statistics.median(wall["train"]),
                     size / statistics.median(wall["fisher"]), ratio))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    cmd = "python benchmarks/fisher_families.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Fisher throughput by model family", "", f"Command: `{cmd.strip()}`", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, Python "
             f"{platform.python_version()}, load average before the run {load}; chunk size {args.chunk_size}; "
             f"medians of {args.repeats} interleaved repeats after {args.warmup} warm-up.", "",
             "| model | parameters | batch | training step samples/s | Fisher samples/s | Fisher / training step |",
             "|---|---:|---|---:|---:|---:|"]
    for name, n, shape, tr, fi, ratio in rows:
        lines.append(f"| {name} | {n / 1e6:.1f}M | {shape} | {tr:.1f} | {fi:.1f} | **{ratio:.2f}** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
