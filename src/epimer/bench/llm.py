"""Tasks and scoring of the causal-LM benchmark (``epimer bench llm``, work in progress).

The eight text tasks of the offline benchmark (`epimer.bench.data`) become instructions
whose answers are label words, scored as lm-eval-harness scores multiple choice: the
log-likelihood of each choice's tokens after the prompt, the highest wins. One task has a
free-text answer: the name of an emoji, from the emoji lexicon shipped in the vaderSentiment
sdist (Unicode CLDR short names), scored by exact match of the greedy continuation.
Fine-tuning and the Fisher use the same prompts with the gold answer as the completion
(`epimer.curvature.causal_lm`: the loss on the answer's tokens only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from epimer.bench import artifacts
from epimer.bench.data import TaskData, load_task

#: task -> (instruction, answer word per class in the task's label order); texts are cut to
#: MAX_WORDS words so that a prompt fits a short context.
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vader_tweets": ("Is the sentiment of this tweet negative or positive?", ("negative", "positive")),
    "vader_movie_reviews": ("Is the sentiment of this movie review negative or positive?", ("negative", "positive")),
    "vader_amazon_reviews": ("Is the sentiment of this product review negative or positive?",
                             ("negative", "positive")),
    "vader_nyt_editorials": ("Is the sentiment of this editorial negative or positive?", ("negative", "positive")),
    "rt_sentiment": ("Is this movie review negative or positive?", ("negative", "positive")),
    "rt_subjectivity": ("Is this text a plot summary or a review?", ("summary", "review")),
    "debate_party": ("Was this said by a Democrat or a Republican?", ("Democrat", "Republican")),
    "bbc_news": ("What is the topic of this news article: business, entertainment, politics, sport or tech?",
                 ("business", "entertainment", "politics", "sport", "tech")),
}
MAX_WORDS = 48
EMOJI_TASK = "emoji_names"
EMOJI_MEMBER = "vaderSentiment-3.3.2/vaderSentiment/emoji_utf8_lexicon.txt"


@dataclass(frozen=True)
class LLMTask:
    """Prompts and gold answers of one task (or split of it).

    Attributes:
        name: task name.
        prompts: the instruction and the input, ending with "Answer:".
        answers: the gold answer strings (a choice, or the free text).
        choices: the answer strings to score (multiple choice), or () for free text.
    """

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> "LLMTask":
        return LLMTask(self.name, tuple(self.prompts[i] for i in indices), tuple(self.answers[i] for i in indices),
                       self.choices)

    def samples(self) -> list[dict[str, str]]:
        """``{"prompt", "completion"}`` samples: the answer (with a leading space) completes the prompt."""
        return [{"prompt": p, "completion": " " + a} for p, a in zip(self.prompts, self.answers)]


def _cut(text: str, words: int = MAX_WORDS) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def choice_task(data: TaskData) -> LLMTask:
    """A text-classification task as instructions with label-word answers."""
    instruction, words = TEMPLATES[data.name]
    prompts = tuple(f"{instruction}\nText: {_cut(t)}\nAnswer:" for t in data.texts)
    return LLMTask(data.name, prompts, tuple(words[y] for y in data.labels), words)


def emoji_task() -> LLMTask:
    """Name the emoji: the lexicon's single-character emoji and their names (skin-tone and
    other multi-character variants left out; a name given to two emoji kept once)."""
    raw = artifacts.read_member(artifacts.fetch(artifacts.VADER), EMOJI_MEMBER).decode("utf-8")
    seen: set[str] = set()
    prompts, answers = [], []
    for line in raw.splitlines():
        emoji, _, name = line.partition("\t")
        name = name.strip()
        if len(emoji) != 1 or not name or ":" in name or name in seen:
            continue
        seen.add(name)
        prompts.append(f"What is the name of this emoji? {emoji}\nAnswer:")
        answers.append(name)
    return LLMTask(EMOJI_TASK, tuple(prompts), tuple(answers))


def load_llm_task(name: str) -> LLMTask:
    return emoji_task() if name == EMOJI_TASK else choice_task(load_task(name))


@torch.no_grad()
def choice_loglik(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], choices: Sequence[str],
                  batch_size: int = 16) -> torch.Tensor:
    """(N, C) log-likelihood of each choice's tokens (with a leading space) after each prompt:
    Σ_t log p(choice token t | prompt, earlier choice tokens), as lm-eval-harness scores
    multiple choice. Sequences are right-padded; a causal model's outputs at a position
    depend only on earlier ones, so padding changes nothing."""
    device = next(model.parameters()).device
    tails = [list(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in choices]  # type: ignore
    if all(len(t) == 1 for t in tails):  # one token a choice: one forward of each prompt scores them all
        return _single_token_loglik(model, tokenizer, prompts, [t[0] for t in tails], batch_size, device)
    rows: list[tuple[list[int], int]] = []  # (token ids, where the choice starts)
    for p in prompts:
        head = list(tokenizer(p, add_special_tokens=True)["input_ids"])  # type: ignore[operator]
        for c in choices:
            tail = list(tokenizer(" " + c, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
            rows.append((head + tail, len(head)))
    out = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        for i, (r, _) in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
        logp = torch.log_softmax(model(input_ids=ids.to(device)).logits.double(), dim=-1)  # (B, L, V)
        for i, (r, begin) in enumerate(chunk):
            pos = torch.arange(begin, len(r))
            out[start + i] = logp[i, pos - 1, torch.tensor(r[begin:])].sum().cpu()
    return out.reshape(len(prompts), len(choices))


def _single_token_loglik(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], tokens: list[int],
                         batch_size: int, device: torch.device) -> torch.Tensor:
    heads = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]  # type: ignore[operator]
    out = torch.empty(len(prompts), len(tokens), dtype=torch.float64)
    for start in range(0, len(heads), batch_size):
        chunk = heads[start : start + batch_size]
        ids = torch.zeros(len(chunk), max(len(h) for h in chunk), dtype=torch.long)
        for i, h in enumerate(chunk):
            ids[i, : len(h)] = torch.tensor(h)
        logits = model(input_ids=ids.to(device)).logits  # (B, L, V)
        last = torch.tensor([len(h) - 1 for h in chunk], device=logits.device)
        logp = torch.log_softmax(logits[torch.arange(len(chunk)), last].double(), dim=-1)  # (B, V)
        out[start : start + len(chunk)] = logp[:, tokens].cpu()
    return out


def choice_accuracy(model: torch.nn.Module, tokenizer: object, task: LLMTask, batch_size: int = 16) -> float:
    scores = choice_loglik(model, tokenizer, task.prompts, task.choices, batch_size)
    gold = torch.tensor([task.choices.index(a) for a in task.answers])
    return float((scores.argmax(dim=1) == gold).double().mean())


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: object, task: LLMTask, max_new_tokens: int = 12) -> float:
    """Share of prompts whose greedy continuation, up to its first line break or the end of
    sequence, equals the gold answer (surrounding spaces ignored)."""
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    hits = 0
    for prompt, answer in zip(task.prompts, task.answers):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=device)  # type: ignore
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos if eos is not None
                             else 0)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # type: ignore[attr-defined]
        hits += text.split("\n")[0].strip() == answer.strip()
    return hits / max(1, len(task))


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the batch's sequences of each one's mean target-token loss: the per-sample
    loss of the Fisher (`epimer.curvature.causal_lm.CausalLMLoss`), averaged."""
    from epimer.curvature.causal_lm import IGNORE

    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, L-1, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    nll = -torch.log_softmax(logits, dim=-1).gather(2, target.clamp(min=0).unsqueeze(2)).squeeze(2)
    return ((nll * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()


def finetune(model: torch.nn.Module, tokenizer: object, task: LLMTask, *, steps: int, lr: float, batch_size: int,
             max_length: int, trainable: str, seed: int) -> list[float]:
    """Fine-tune ``model`` in place on the task's prompt → answer samples (the loss on the
    answer tokens only), AdamW on the parameters whose names match the regular expression
    ``trainable`` (the others frozen), batches drawn with a seeded generator. Returns the loss
    of each step."""
    import re

    from epimer.curvature.causal_lm import batches, encode_sample

    pattern = re.compile(trainable)
    params = [p for n, p in model.named_parameters() if pattern.search(n)]
    if not params:
        raise ValueError(f"no parameter matches {trainable!r}")
    for n, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(n)))
    samples = [encode_sample(s, tokenizer, max_length, f"{task.name}:{i}") for i, s in enumerate(task.samples())]
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(samples), (batch_size,), generator=g).tolist()
        batch = next(batches([samples[i] for i in idx], batch_size, pad))
        loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses
