"""Create a small base model and three "fine-tuned" copies to try epimer on.

The base is a randomly initialised BERT (transformers, built from a config, no download);
each task model adds a low-rank update plus noise to the base's weights, the way fine-tuning
moves a pretrained model. Everything is written as Hugging Face folders under
``examples/checkpoints/``, and a synthetic Fisher file per task goes beside them so the
curvature-aware methods run too.

    python examples/make_checkpoints.py
    epimer merge examples/ties.yaml -o examples/merged/ties
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoints")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import BertConfig, BertModel

    from epimer.fingerprint import fingerprint_tensors

    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128)
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
        # A synthetic diagonal Fisher with the structure of a linear layer's (outer product of
        # input and output second moments, times noise), keyed like the checkpoint.
        saved = {n: v for n, v in model.state_dict().items()}
        fisher = {}
        for name, w in saved.items():
            if not w.is_floating_point():
                continue
            if w.ndim == 2:
                out_m = torch.rand(w.shape[0], 1, generator=gen) + 0.1
                in_m = torch.rand(1, w.shape[1], generator=gen) + 0.1
                noise = torch.exp(0.1 * torch.randn(w.shape, generator=gen))
                fisher[name] = (out_m @ in_m * noise * (t + 1)).contiguous()
            else:
                fisher[name] = torch.rand(w.shape, generator=gen) + 0.1
        save_file(fisher, str(args.out / f"task_{t}.fisher.safetensors"),
                  metadata={"format": "epimer-fisher", "num_samples": "0", "estimator": "synthetic",
                            "seed": str(args.seed), "fraction": "1.0",
                            "fingerprint": fingerprint_tensors(saved, fisher)})
    print(f"wrote a base and {args.tasks} task models (with synthetic Fisher files) under {args.out}")


if __name__ == "__main__":
    main()
