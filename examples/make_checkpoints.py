"""Create a small base model and three "fine-tuned" copies to try epimer on.

The base is a randomly initialised BERT (transformers, built from a config, no download);
each task model adds a low-rank update plus noise to the base's weights, the way fine-tuning
moves a pretrained model. Everything is written as Hugging Face folders under
``examples/checkpoints/``, with a Fisher file per task beside them (the empirical Fisher of a
toy classification task), so the curvature-aware methods run too.

    python examples/make_checkpoints.py
    epimer merge examples/ties.yaml -o examples/merged/ties
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoints")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import BertConfig, BertModel

    from epimer.curvature.fisher import CrossEntropyLoss, estimate_fisher
    from epimer.io.fisher import save_fisher
    from epimer.fingerprint import fingerprint_tensors

    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128,
                        attn_implementation="eager")  # eager attention has vmap rules (Fisher)
    base = BertModel(config).eval()
    base.save_pretrained(args.out / "base")
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for t in range(args.tasks):
        model = BertModel(config).eval()
        sd = {}
        for name, w in base_sd.items():
            if not w.is_floating_point():
                sd[name] = w
            elif w.ndim == 2:
                # A rank-4 update (fine-tuning moves few directions) plus small noise.
                a = torch.randn(w.shape[0], 4, generator=gen) * 0.02
                b = torch.randn(4, w.shape[1], generator=gen)
                sd[name] = w + a @ b / 4 + 0.002 * torch.randn(w.shape, generator=gen)
            else:
                sd[name] = w + 0.01 * torch.randn(w.shape, generator=gen)
        model.load_state_dict(sd)
        folder = args.out / f"task_{t}"
        model.save_pretrained(folder)
        # The empirical Fisher of a toy task: a frozen random linear head on mean-pooled
        # features, 64 random token sequences with random labels (docs/method.md §4, eq. 9).
        head = torch.randn(config.hidden_size, 2, generator=gen)
        loss = CrossEntropyLoss(logits_of=lambda out, h=head: out.last_hidden_state.mean(1) @ h,
                                additive_padding_mask=True)
        ids = torch.randint(1, config.vocab_size, (64, 16), generator=gen)
        batches = [{"input_ids": ids[i:i + 32], "attention_mask": torch.ones(32, 16, dtype=torch.long),
                    "labels": torch.randint(0, 2, (32,), generator=gen)} for i in (0, 32)]
        fisher = estimate_fisher(model, batches, loss)
        save_fisher(args.out / f"task_{t}.fisher.safetensors", fisher, num_samples=64, estimator="empirical",
                    seed=args.seed, fraction=1.0, model_fingerprint=fingerprint_tensors(model.state_dict(), fisher))
    print(f"wrote a base and {args.tasks} task models (with Fisher files) under {args.out}")


if __name__ == "__main__":
    main()
