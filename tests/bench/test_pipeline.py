"""The benchmark pipeline end to end on a tiny random BERT and two synthetic tasks (seconds,
no download): fine-tuning is deterministic and cached, every registered method is merged
and scored, and the report is written."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epimer.bench import pipeline, report  # noqa: E402
from epimer.bench.data import TaskData, split_task  # noqa: E402
from epimer.bench.evaluate import Evaluator, encode  # noqa: E402
from epimer.bench.finetune import (  # noqa: E402
    FinetuneSettings,
    FisherSettings,
    base_state,
    finetune_encoder,
    load_encoder,
    load_tokenizer,
    task_fisher,
    task_model,
    train_probe,
)
from epimer.bench.pipeline import BenchConfig, method_specs, run_benchmark, scaled  # noqa: E402
from epimer.registry import available_methods  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = ["the", "a", "it", "was", "and", "so", "very", "this", "that", "one", "day", "we", "they", "said"]
# Two binary tasks whose label is carried by a few cue words among filler.
CUES = {
    "syn_sentiment": (["good", "great", "fine"], ["bad", "awful", "poor"]),
    "syn_topic": (["ball", "goal", "match"], ["vote", "law", "party"]),
}
SETTINGS = FinetuneSettings(steps=20, batch_size=8, lr=2e-3, warmup_fraction=0.2, max_length=16,
                            probe_shots=6, probe_max_iter=50)


def _task(name: str, n: int = 120) -> TaskData:
    rng = random.Random(name)
    texts, labels, seen = [], [], set()
    while len(texts) < n:
        label = len(texts) % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(CUES[name][label]))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return TaskData(name, texts, labels, ["neg", "pos"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and a word-level vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = SPECIAL + FILLER + [w for pair in CUES.values() for side in pair for w in side]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))  # the vocabulary file, positionally
    tokenizer.save_pretrained(str(folder))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and determinism is per thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    return {name: _task(name) for name in CUES}


def test_finetuning_is_deterministic_for_a_seed(tiny_model: Path, tasks: dict[str, TaskData]) -> None:
    tokenizer = load_tokenizer(tiny_model)
    splits = split_task(tasks["syn_topic"], 0)
    train = encode(tokenizer, splits.train, SETTINGS.max_length)
    encoder = load_encoder(tiny_model)
    from epimer.bench.evaluate import features

    feats = features(encoder, train)
    head, info = train_probe(feats, train.labels, feats, train.labels, 2, SETTINGS.probe_l2, 50)
    assert set(info) == {"l2", "train_acc", "val_acc"}

    def run(seed: int) -> dict[str, torch.Tensor]:
        enc = load_encoder(tiny_model)
        finetune_encoder(enc, head, train, SETTINGS, seed)
        return enc.state_dict()

    first, again, other = run(0), run(0), run(1)
    base = load_encoder(tiny_model).state_dict()
    assert list(first) == list(base)
    for k in first:
        assert torch.equal(first[k], again[k]), k
    changed = [k for k in first if not torch.equal(first[k], base[k])]
    assert changed and "embeddings.word_embeddings.weight" not in changed  # frozen by default
    assert not any(k.startswith("pooler.") for k in changed)  # unused by mean pooling
    assert any(not torch.equal(first[k], other[k]) for k in changed)  # another seed, another model


def test_task_model_and_fisher_are_cached(tiny_model: Path, tasks: dict[str, TaskData], tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    base, fp = base_state(tiny_model)
    splits = split_task(tasks["syn_sentiment"], 0)
    kw = dict(cache_root=tmp_path, base_fingerprint=fp, base_keys=list(base), tokenizer=tokenizer)
    steps: list[int] = []
    made = task_model(tiny_model, splits, 0, SETTINGS, advance=steps.append, **kw)
    assert (made.model_dir / "model.safetensors").is_file() and (made.model_dir / "vocab.txt").is_file()
    assert sum(steps) == SETTINGS.steps
    again = task_model(tiny_model, splits, 0, SETTINGS, **kw)
    assert again.folder == made.folder
    assert all(torch.equal(made.encoder[k], again.encoder[k]) for k in base)
    # the folder is a loadable model whose weights are the cached state dict
    reloaded = transformers.AutoModel.from_pretrained(str(made.model_dir)).state_dict()
    assert all(torch.equal(reloaded[k], made.encoder[k]) for k in reloaded)
    other = task_model(tiny_model, splits, 0, replace(SETTINGS, steps=SETTINGS.steps + 1), **kw)
    assert other.folder != made.folder

    fs = FisherSettings(fraction=0.5, batch_size=8, chunk_size=4)
    fisher = task_fisher(made, tiny_model, splits.train, fs, SETTINGS, tokenizer=tokenizer)
    assert "pooler.dense.weight" not in fisher and "embeddings.word_embeddings.weight" not in fisher
    assert set(fisher) <= set(base)
    assert all(v.shape == base[k].shape and bool((v >= 0).all()) for k, v in fisher.items())
    assert sum(float(v.sum()) for v in fisher.values()) > 0
    files = list(made.folder.glob("fisher-*.safetensors"))
    assert len(files) == 1
    # the file belongs to the cached model folder: `epimer merge` accepts the pair
    from epimer.io.fisher import check_fisher
    from epimer.fingerprint import checkpoint_blocks
    from epimer.io.reader import open_checkpoint

    ckpt = open_checkpoint(made.model_dir)
    meta = check_fisher(files[0], ckpt.names(), lambda n: ckpt.meta(n).shape, checkpoint_blocks(ckpt))
    assert meta.fraction == 0.5 and meta.num_samples == round(0.5 * len(splits.train))
    cached = task_fisher(made, tiny_model, splits.train, fs, SETTINGS, tokenizer=tokenizer)
    assert all(torch.equal(cached[k], fisher[k]) for k in fisher)


def test_method_specs_cover_the_registry() -> None:
    specs = method_specs(BenchConfig(tasks=("a", "b"), rank_fraction=0.5))
    assert {s.method for s in specs} == set(available_methods())
    by_label = {s.label: s for s in specs}
    assert by_label["tsv_m"].params["rank_fraction"] == by_label["epimer"].params["rank_fraction"] == 0.5
    assert {s.params.get("fisher_norm") for s in specs if s.method == "epimer"} == {"none", "global", "tensor"}
    assert not by_label["weight_average"].has_scale and by_label["task_arithmetic"].has_scale
    assert by_label["epimer"].needs_fisher and not by_label["tsv_m"].needs_fisher


def test_scaled_is_base_plus_scale_times_delta() -> None:
    base = {"w": torch.ones(2, 2), "ids": torch.arange(3)}
    out = scaled(base, {"w": torch.full((2, 2), 2.0)}, 0.25)
    assert torch.equal(out["w"], torch.full((2, 2), 1.5)) and out["ids"] is base["ids"]


class RecordingProgress(pipeline.Progress):
    """Records the stages and the tasks reported within each."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.tasks: list[tuple[str, str, int, int]] = []

    @contextmanager
    def stage(self, label: str, total: int) -> Iterator[pipeline.Advance]:
        self.stages.append(label)
        yield lambda n: None

    @contextmanager
    def task(self, name: str, index: int, count: int) -> Iterator[None]:
        self.tasks.append((self.stages[-1], name, index, count))
        yield


def test_pipeline_end_to_end(tiny_model: Path, tasks: dict[str, TaskData], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = BenchConfig(tasks=tuple(tasks), seeds=(0,), finetune=SETTINGS,
                         fisher=FisherSettings(fraction=0.5, batch_size=8, chunk_size=8),
                         max_val=None, max_test=None, scale_grid=(0.5, 1.5), epimer_fisher_norms=("none", "global"),
                         epimer_metrics=("diagonal", "projected"),
                         rank_fractions=(0.25, 1.0), fisher_fractions=(0.2, 0.5), study_grid=(1.5,),
                         auto_scale=True)
    out = tmp_path / "report"
    progress = RecordingProgress()
    results = run_benchmark(config, out, model_path=tiny_model, tasks=tasks, cache_root=tmp_path / "cache",
                            progress=progress)
    # every fine-tuning and Fisher stage reports its tasks, one by one (plain progress lines)
    per_task = [label for label in progress.stages if re.match(r"seed \d+: (fine-tuning|Fisher)", label)]
    assert "seed 0: Fisher on 0.2 of the training texts" in per_task
    assert progress.tasks == [(label, name, i, len(tasks)) for label in per_task
                              for i, name in enumerate(tasks, start=1)]

    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["tasks"] == list(tasks)
    for name in ("results.md", "per_task.png", "scale_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    (run,) = results["runs"]
    assert "pooler.dense.weight" in run["excluded"] and "embeddings.word_embeddings.weight" in run["excluded"]
    refs = run["references"]
    assert refs["finetuned"]["normalized"] == pytest.approx(1.0)
    # the cue words are learnable: fine-tuning beats the few-shot probe on average
    assert refs["finetuned"]["avg"] > refs["pretrained"]["avg"]

    labels = [m["label"] for m in run["methods"]]
    assert set(available_methods()) <= set(labels) and "epimer (fisher_norm=global)" in labels
    assert {"epimer (metric=projected)", "epimer (metric=projected, fisher_norm=global)"} <= set(labels)
    for m in run["methods"]:
        assert set(m["test"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in m["test"].values())
        assert m["worst"] == min(m["test"].values()) and m["merge_seconds"] >= 0
        if m["has_scale"]:
            assert [p["scale"] for p in m["sweep"]] == [0.5, 1.0, 1.5]
            assert m["scale"] in (0.5, 1.0, 1.5)
            assert m["val_avg"] == max(p["val_avg"] for p in m["sweep"])
            # the surrogate's minimiser along Δ: finite, though not always positive (TIES' trimmed Δ)
            assert math.isfinite(m["auto"]["scale"]) and set(m["auto"]["test"]) == set(tasks)
        else:
            assert m["scale"] is None and m["sweep"] == []

    # weight_average is task arithmetic at scale 1/T: rescaling the scale-1 merge gives that model
    rows = {m["label"]: m for m in run["methods"]}
    ta_half = next(p for p in rows["task_arithmetic"]["sweep"] if p["scale"] == 0.5)
    assert ta_half["val"] == pytest.approx(rows["weight_average"]["val"], abs=1e-9)
    models = [json.loads((Path(i["cache"]) / "finetune.json").read_text()) for i in run["tasks"].values()]
    assert all(m["finetune"]["losses"] for m in models)

    text = (out / "results.md").read_text()
    for needle in ("Table 2", "Table 3", "Table 4", "EpiMer", "TSV-M", "Fine-tuned (individual)"):
        assert needle in text
    header, body = report.comparison(results)
    assert len(header) == len(body[0])
    assert rows["epimer"]["auto"]["val"].keys() == set(tasks)

    # the studies: at the headline's own rank and Fisher fraction they merge the same model, so
    # their validation accuracies at the scales both grids hold are the headline's
    studies = run["studies"]
    assert [r["rank_fraction"] for r in studies["rank"]] == [0.25, 1.0]
    full = studies["rank"][1]

    def same_sweep(study_row: dict, headline_row: dict) -> None:
        ours = {p["scale"]: p["val"] for p in study_row["sweep"]}
        theirs = {p["scale"]: p["val"] for p in headline_row["sweep"]}
        assert set(ours) == {1.0, 1.5} and ours[1.0] == theirs[1.0] and ours[1.5] == theirs[1.5]

    same_sweep(full["tsv_m"], rows["tsv_m"])
    same_sweep(full["epimer"], rows["epimer"])
    for r in studies["rank"]:
        assert r["gain"] == pytest.approx(r["epimer"]["avg"] - r["tsv_m"]["avg"])
        d = r["diagnostics"]
        assert d["kappa"] >= 0 and 0 <= d["kappa_rel"] <= 1 and d["bound"] >= 0
    low = studies["rank"][0]
    assert low["tsv_m"]["params"]["rank_fraction"] == low["epimer"]["params"]["rank_fraction"] == 0.25
    assert [f["fraction"] for f in studies["fisher_fraction"]] == [0.2, 0.5]
    same_sweep(studies["fisher_fraction"][1]["epimer"], rows["epimer"])
    n_train = {t: i["n_train"] for t, i in run["tasks"].items()}
    assert studies["fisher_fraction"][0]["samples"] == {t: round(0.2 * n) for t, n in n_train.items()}
    for name in ("rank_sweep.png", "kappa_gain.png", "fisher_fraction.png"):
        assert (out / name).stat().st_size > 0, name
    for needle in ("Rank sweep", "Fisher data fraction", "kappa_rel"):
        assert needle in text

    # a second run reuses the cached task models, Fishers and method rows: no merge runs again
    def no_merge(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached row was merged again")

    monkeypatch.setattr(pipeline, "_run_method", no_merge)
    again = run_benchmark(config, None, model_path=tiny_model, tasks=tasks, cache_root=tmp_path / "cache")
    assert again["runs"][0]["references"] == refs
    assert again["runs"][0]["methods"] == json.loads(json.dumps(run["methods"]))
    assert again["runs"][0]["studies"]["rank"][0]["epimer"] == json.loads(json.dumps(low["epimer"]))


def test_evaluator_scores_each_task_with_its_head(tiny_model: Path, tasks: dict[str, TaskData]) -> None:
    tokenizer = load_tokenizer(tiny_model)
    encoder = load_encoder(tiny_model)
    data = encode(tokenizer, tasks["syn_topic"], 16)
    from epimer.bench.evaluate import Head

    always_one = Head(torch.zeros(2, 32), torch.tensor([0.0, 1.0]))
    ev = Evaluator(encoder, batch_size=7)
    assert ev.accuracy(encoder.state_dict(), always_one, data) == pytest.approx(0.5)
