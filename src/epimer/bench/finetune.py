"""Per-task models of the benchmark: a linear probe, then the encoder fine-tuned under it,
then the empirical Fisher of the fine-tuned encoder; each cached on disk.

The recipe mirrors the paper's checkpoints (Ilharco et al. 2023, paper Appendix C.2: linear
probing followed by full fine-tuning, the classification head frozen):

1. **Linear probe.** Pooled features of the frozen pretrained encoder on the training split;
   a multinomial logistic regression trained on them to convergence (full-batch L-BFGS from
   zero, so it is deterministic without a seed), its L2 strength chosen on the validation
   split. This head is the "pretrained + head" reference row and is frozen from here on.
2. **Fine-tuning.** The encoder is trained through the frozen head with AdamW (linear
   warm-up, linear decay), cross-entropy, for a fixed step budget. The word-embedding table
   stays frozen (`FinetuneSettings.freeze_word_embeddings`).
3. **Fisher.** The empirical Fisher diagonal (docs/method.md §4, eq. 9) of the task loss
   ``CE(head(pool(encoder(x))), y)`` with respect to the encoder's trainable parameters, at
   the fine-tuned weights, over a seeded prefix of the shuffled training split.

Everything is cached under ``$EPIMER_CACHE/bench/<key>/`` where the key hashes the pretrained
weights (a fingerprint), the task's training and validation data, the seed and every setting,
so a rerun loads what is done and resumes what is not:

    <key>/settings.json        what the key hashes (readable)
    <key>/model/               the fine-tuned encoder: save_pretrained + tokenizer files
    <key>/head.safetensors     the frozen probe head (weight (C, H), bias (C,))
    <key>/finetune.json        probe and training figures (written last: marks completion)
    <key>/fisher-<fkey>.safetensors   Fisher files (`epimer.io.fisher` format)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from epimer.bench.data import Splits, TaskData
from epimer.bench.evaluate import Encoded, Head, accuracy_of_features, encode, features, pooled
from epimer.curvature.heads import PooledClassifier, pooled_head_loss
from epimer.cores import follow as follow_free_cores
from epimer.errors import InputError
from epimer.fingerprint import fingerprint_tensors

#: Bumped when the recipe changes in a way the settings do not show, to invalidate caches.
RECIPE_VERSION = 1
#: Files of a model folder that make its tokenizer loadable (config.json is saved by the model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"

Advance = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


@dataclass(frozen=True)
class FinetuneSettings:
    """How one task model is made. Every field enters the cache key.

    The defaults are the benchmark's ("text8"), sized so that 8 tasks × 3 seeds fine-tune in
    under an hour on two CPU cores; `epimer.bench.pipeline.DEMO` shrinks the budget further.
    Sequence lengths: the median text of seven tasks is 20-50 tokens, so 64 cuts about a third
    of the plot summaries and debate turns and every news article (median 416), whose topic
    the first 62 tokens give away.
    """

    # 3200 texts: ~1.5 epochs of the median training split (~2,000 texts)
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4  # the top of the usual range for BERT-size encoders (2e-5 .. 1e-4): few steps
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # linear warm-up over this share of the steps, then linear decay to 0
    max_grad_norm: float = 1.0
    max_length: int = 64  # tokens per text, [CLS] and [SEP] included
    max_train: int | None = None  # stratified cap on the training split (None: all of it)
    # The 30522 x 384 table is half of MiniLM's parameters, yet a short run moves only the rows
    # of the tokens it sees. Frozen, it has no task vector: merges, Fishers and optimiser
    # steps all get about half as large, and no method gains or loses by it.
    freeze_word_embeddings: bool = True
    # The probe sees this many training texts per class (None: the whole split). CLIP's
    # zero-shot heads, which the paper's encoders are fine-tuned under, know the classes but
    # not the training set; a few-shot probe is the text analogue. A probe fitted on the whole
    # split fits it perfectly (train accuracy 1.0 on MiniLM features), leaving fine-tuning
    # almost no loss to reduce and the task vectors near zero.
    probe_shots: int | None = 32
    probe_l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths tried; the best on validation is kept
    probe_max_iter: int = 200  # L-BFGS iterations (the probe's loss is convex)
    dropout: bool = True  # the encoder's own dropout (0.1 for MiniLM) during fine-tuning

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.max_length < 2:
            raise InputError(f"bad fine-tuning settings: {self.steps=}, {self.batch_size=}, {self.lr=}, "
                             f"{self.max_length=}")
        if self.probe_shots is not None and self.probe_shots < 1:
            raise InputError(f"probe_shots must be positive or None; got {self.probe_shots=}")
        if not self.probe_l2:
            raise InputError("probe_l2 needs at least one L2 strength")


@dataclass
class TaskModel:
    """A fine-tuned task model, as cached.

    Attributes:
        task, seed: what it was trained on.
        folder: its cache folder (``<key>/``).
        encoder: the fine-tuned encoder's state dict (keys as the pretrained ``state_dict()``).
        head: the frozen probe head.
        info: probe and training figures (``finetune.json``).
    """

    task: str
    seed: int
    folder: Path
    encoder: dict[str, torch.Tensor]
    head: Head
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"


# ------------------------------------------------------------------------------ encoder


def load_encoder(model_path: Path, *, eager: bool = False) -> nn.Module:
    """The pretrained encoder of a model folder (a ``BertModel`` for MiniLM), float32.

    ``eager`` selects the plain attention implementation, which torch.func transforms
    (per-sample gradients) support; SDPA is faster for ordinary forward passes.
    """
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"attn_implementation": "eager"} if eager else {}
    return AutoModel.from_pretrained(str(model_path), **kwargs).to(torch.float32)


def load_tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def state_dict_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's state dict (safe to keep while training continues)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ probe


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> Head:
    """Multinomial logistic regression, ``mean CE + l2/2·‖W‖²``, full-batch L-BFGS from zero."""
    w = torch.zeros((num_classes, x.shape[1]), dtype=torch.float64, requires_grad=True)  # (C, H)
    b = torch.zeros((num_classes,), dtype=torch.float64, requires_grad=True)  # (C,)
    x64 = x.to(torch.float64)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x64 @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Head(w.detach().to(torch.float32), b.detach().to(torch.float32))


def train_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2_grid: Sequence[float],
    max_iter: int = 200,
) -> tuple[Head, dict[str, float]]:
    """The linear probe on frozen features: the L2 strength with the best validation accuracy
    (ties to the stronger regularisation, listed later in ``l2_grid`` when sorted ascending).

    Args:
        train_x, val_x: (N, H) pooled features. train_y, val_y: (N,) int64 labels.
    Returns:
        (head, {"l2", "train_acc", "val_acc"}).
    """
    best: tuple[float, float, Head] | None = None
    for l2 in sorted(l2_grid):
        head = _fit_logistic(train_x, train_y, num_classes, l2, max_iter)
        acc = accuracy_of_features(val_x, head, val_y) if len(val_y) else 0.0
        if best is None or acc >= best[0]:
            best = (acc, l2, head)
    assert best is not None
    acc, l2, head = best
    return head, {"l2": l2, "train_acc": accuracy_of_features(train_x, head, train_y), "val_acc": acc}


def probe_subset(train: TaskData, shots: int | None, seed: int) -> TaskData:
    """The probe's training texts: ``shots`` per class (all of a smaller class), seeded."""
    if shots is None:
        return train
    rng = random.Random(f"{train.name}/{seed}/probe")
    keep: list[int] = []
    for c in range(train.num_classes):
        idx = [i for i, y in enumerate(train.labels) if y == c]
        rng.shuffle(idx)
        keep += idx[:shots]
    return train.subset(sorted(keep))


# ------------------------------------------------------------------------------ fine-tuning


def _batches(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """``steps`` index batches: epochs of a fresh seeded permutation each, cut into batches."""
    out: list[list[int]] = []
    pool: list[int] = []
    while len(out) < steps:
        if len(pool) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            pool += perm
        out.append(pool[:batch_size])
        pool = pool[batch_size:]
    return out


def _trainable(encoder: nn.Module, settings: FinetuneSettings) -> list[tuple[str, nn.Parameter]]:
    params = []
    for name, p in encoder.named_parameters():
        frozen = (settings.freeze_word_embeddings and name == WORD_EMBEDDINGS) or name.startswith("pooler.")
        p.requires_grad_(not frozen)
        if not frozen:
            params.append((name, p))
    return params


def finetune_encoder(
    encoder: nn.Module,
    head: Head,
    train: Encoded,
    settings: FinetuneSettings,
    seed: int,
    advance: Advance = _no_progress,
) -> dict[str, Any]:
    """Fine-tune ``encoder`` in place through the frozen ``head`` (cross-entropy).

    The pooler is unused by mean pooling and stays frozen, as does the word-embedding table
    when the settings say so. Deterministic for a seed on a given machine and thread count:
    batches come from ``random.Random(seed)``, dropout from a forked torch RNG seeded with it.

    Returns:
        {"losses": mean loss per tenth of the run, "seconds": wall time}.
    """
    named = _trainable(encoder, settings)
    decay = [p for n, p in named if p.ndim >= 2]  # no weight decay on biases and LayerNorms
    no_decay = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    warmup = max(1, round(settings.warmup_fraction * settings.steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    batches = _batches(len(train), settings.batch_size, settings.steps, random.Random(f"finetune/{seed}"))
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder.train(settings.dropout)
        for idx in batches:
            follow_free_cores()
            batch = train.batch(idx)
            loss = F.cross_entropy(head(pooled(encoder, batch)), train.labels[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(1)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(True)
    tenth = max(1, math.ceil(len(losses) / 10))
    curve = [sum(losses[i : i + tenth]) / len(losses[i : i + tenth]) for i in range(0, len(losses), tenth)]
    return {"losses": curve, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------ caching


def _data_digest(data: TaskData) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([data.name, data.label_names]).encode())
    for text, label in zip(data.texts, data.labels):
        h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()[:16]


def cache_key(payload: Mapping[str, Any]) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of ``payload``."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_settings(
    base_fingerprint: str, splits: Splits, seed: int, settings: FinetuneSettings
) -> dict[str, Any]:
    """What identifies one task model: the settings its cache key hashes."""
    return {
        "recipe": RECIPE_VERSION,
        "base": base_fingerprint,
        "task": splits.train.name,
        "train": _data_digest(splits.train),
        "val": _data_digest(splits.val),
        "seed": seed,
        "settings": asdict(settings),
    }


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh folder beside ``final``, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if final.exists():  # a concurrent run finished first: keep its copy
            shutil.rmtree(tmp)
            return
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_cached(folder: Path, task: str, seed: int, base_keys: Sequence[str]) -> TaskModel | None:
    info_file = folder / "finetune.json"
    if not info_file.is_file():
        return None
    encoder = load_file(str(folder / "model" / "model.safetensors"))
    missing = [k for k in base_keys if k not in encoder]
    if missing:
        raise InputError(f"{folder / 'model'}: cached encoder lacks {missing[:3]}; delete {folder} to rebuild it")
    encoder = {k: encoder[k] for k in base_keys}
    head = Head.from_state_dict(load_file(str(folder / "head.safetensors")))
    return TaskModel(task, seed, folder, encoder, head, json.loads(info_file.read_text()))


def task_model(
    model_path: Path,
    splits: Splits,
    seed: int,
    settings: FinetuneSettings,
    *,
    cache_root: Path,
    base_fingerprint: str,
    base_keys: Sequence[str],
    tokenizer: Any,
    advance: Advance = _no_progress,
) -> TaskModel:
    """The probe head and fine-tuned encoder of one task and seed: from the cache, or made
    (probe, fine-tuning) and cached.

    Args:
        model_path: pretrained model folder.
        splits: the task's splits (train for the probe and fine-tuning, val for the probe's L2).
        seed: fine-tuning seed (batches, dropout).
        cache_root: ``$EPIMER_CACHE/bench``.
        base_fingerprint: `epimer.fingerprint.fingerprint_tensors` of the pretrained weights.
        base_keys: the pretrained ``state_dict()`` keys, which the cached encoder must hold.
        tokenizer: the pretrained folder's tokenizer.
        advance: called with 1 per fine-tuning step (progress bars).
    """
    meta = task_settings(base_fingerprint, splits, seed, settings)
    folder = cache_root / cache_key(meta)
    cached = _load_cached(folder, splits.train.name, seed, base_keys)
    if cached is not None:
        advance(settings.steps)
        return cached

    start = time.perf_counter()
    encoder = load_encoder(model_path)
    train = encode(tokenizer, splits.train, settings.max_length)
    val = encode(tokenizer, splits.val, settings.max_length)
    shots = encode(tokenizer, probe_subset(splits.train, settings.probe_shots, seed), settings.max_length)
    head, probe = train_probe(features(encoder, shots), shots.labels, features(encoder, val), val.labels,
                              splits.train.num_classes, settings.probe_l2, settings.probe_max_iter)
    probe.update(n_shots=len(shots), seconds=time.perf_counter() - start)
    run = finetune_encoder(encoder, head, train, settings, seed, advance)
    info = {"task": splits.train.name, "seed": seed, "probe": probe, "finetune": run,
            "n_train": len(train), "n_val": len(val)}

    def write(tmp: Path) -> None:
        encoder.save_pretrained(str(tmp / "model"))
        for name in TOKENIZER_FILES:
            if (model_path / name).is_file():
                shutil.copy2(model_path / name, tmp / "model" / name)
        save_file(head.state_dict(), str(tmp / "head.safetensors"))
        (tmp / "settings.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2) + "\n")

    _atomic_dir(folder, write)
    loaded = _load_cached(folder, splits.train.name, seed, base_keys)
    assert loaded is not None
    return loaded


def base_state(model_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The pretrained encoder's state dict and its fingerprint (for cache keys)."""
    sd = state_dict_of(load_encoder(model_path))
    return sd, fingerprint_tensors({k: v for k, v in sd.items() if v.is_floating_point()})


# ------------------------------------------------------------------------------ Fisher


@dataclass(frozen=True)
class FisherSettings:
    """How each task's Fisher is estimated (docs/method.md §4). Every field enters the file's key.

    Attributes:
        fraction: share of the training split used: a seeded shuffle's prefix of
            ``max(1, round(fraction·n))`` texts (`epimer.curvature.fisher.select_fraction`).
        estimator: "empirical" (true labels, eq. 9) or "true" (labels drawn from the model).
        seed: seeds the selection (and the label draws of the "true" estimator).
        batch_size: texts per batch; chunk_size: per-sample gradients materialised at once
            (memory: chunk_size × the encoder's trainable parameters × 4 bytes).
    """

    fraction: float = 0.1
    estimator: str = "empirical"
    seed: int = 0
    batch_size: int = 16
    chunk_size: int = 8

    def key(self) -> dict[str, Any]:
        # batch and chunk sizes change only the summation order, not the estimate
        return {"fraction": self.fraction, "estimator": self.estimator, "seed": self.seed}


def fisher_path(task: TaskModel, fs: FisherSettings) -> Path:
    return task.folder / f"fisher-{cache_key(fs.key())}.safetensors"


def _curvature_setup(task: TaskModel, model_path: Path, train: TaskData, fs: FisherSettings,
                     settings: FinetuneSettings, tokenizer: Any) -> tuple[Any, list[str], Any, int]:
    """What a curvature pass over a fine-tuned encoder needs: the pooled classifier, the
    encoder's trainable parameter names, a batch generator of the chosen training texts
    (a seeded ``fs.fraction`` of them) and their count."""
    from epimer.curvature.fisher import select_fraction

    chosen = select_fraction(len(train), fs.fraction, fs.seed)
    data = encode(tokenizer, train.subset(chosen), settings.max_length)
    encoder = load_encoder(model_path, eager=True)
    encoder.load_state_dict(task.encoder, strict=True)
    names = [n for n, _ in _trainable(encoder, settings)]

    def batches() -> Any:
        for idx in data.by_length(fs.batch_size):
            yield {**data.batch(idx), "labels": data.labels[idx]}

    return PooledClassifier(encoder, task.head.weight, task.head.bias), names, batches, len(data)


def task_fisher(
    task: TaskModel,
    model_path: Path,
    train: TaskData,
    fs: FisherSettings,
    settings: FinetuneSettings,
    *,
    tokenizer: Any,
    advance: Advance = _no_progress,
) -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal of a fine-tuned encoder (docs/method.md §4, eq. 9), cached.

    ``F = (1/N) Σ_n (∇_θ CE(head(pool(encoder_θ(x_n))), y_n))²`` over the encoder's
    trainable parameters θ (the frozen word embeddings and the unused pooler have no task
    vector and are left out), with per-sample gradients from `epimer.curvature.fisher`.
    Keys are the encoder checkpoint's; the file (`epimer.io.fisher` format)
    records N, the estimator, seed, fraction and the fine-tuned encoder's fingerprint.

    Args:
        advance: called with the number of texts of each batch done.
    """
    from epimer.curvature.fisher import estimate_fisher
    from epimer.io.fisher import load_fisher, save_fisher

    path = fisher_path(task, fs)
    if path.is_file():
        fisher = load_fisher(path)
        advance(max(1, round(fs.fraction * len(train))))
        return fisher
    model, names, batches, count = _curvature_setup(task, model_path, train, fs, settings, tokenizer)

    raw = estimate_fisher(model, batches(), pooled_head_loss, params=[f"encoder.{n}" for n in names],
                          estimator=fs.estimator, seed=fs.seed, chunk_size=fs.chunk_size, progress=advance)
    fisher = {n: raw[f"encoder.{n}"] for n in names}
    save_fisher(path, fisher, num_samples=count, estimator=fs.estimator, seed=fs.seed, fraction=fs.fraction,
                model_fingerprint=fingerprint_tensors(task.encoder, names=fisher.keys()))
    return fisher


def task_projected_metrics(
    task: TaskModel,
    model_path: Path,
    train: TaskData,
    fs: FisherSettings,
    settings: FinetuneSettings,
    bases: Any,
    *,
    tokenizer: Any,
    advance: Advance = _no_progress,
) -> dict[str, torch.Tensor]:
    """EpiMer's projected full-Fisher metrics (docs/method.md §3.4, ``metric: projected``) of a
    fine-tuned encoder on ``bases`` (`epimer.engine.MemoryBases`, keys the encoder checkpoint's),
    from the same samples and loss as :func:`task_fisher`; cached per basis digest."""
    from epimer.curvature.fisher import estimate_projected_metrics
    from epimer.io.reader import open_checkpoint

    path = task.folder / f"projected-{cache_key(fs.key())}-{bases.digest[:16]}.safetensors"
    if path.is_file():
        with open_checkpoint(path) as ck:
            metrics = {n: ck.get(n) for n in ck.names()}
        advance(max(1, round(fs.fraction * len(train))))
        return metrics
    model, names, batches, count = _curvature_setup(task, model_path, train, fs, settings, tokenizer)

    wanted = {f"encoder.{n}": (b.u, b.v) for n in bases.names for b in [bases.get(n)] if n in names}
    projected, _ = estimate_projected_metrics(model, batches(), pooled_head_loss, wanted,
                                              params=[f"encoder.{n}" for n in names], estimator=fs.estimator,
                                              seed=fs.seed, chunk_size=fs.chunk_size, progress=advance)
    metrics = {n[len("encoder."):]: h for n, h in projected.items()}
    from epimer.io.fisher import write_safetensors

    write_safetensors(path, {n: metrics[n].float().contiguous() for n in sorted(metrics)},
                      {"format": "epimer-projected-cache", "basis": bases.digest}, "projected metric cache")
    return metrics
