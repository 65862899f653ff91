"""Tasks and scoring of the causal-LM benchmark (``epimer bench llm``).

The eight text tasks of the offline benchmark (`epimer.bench.data`) become instructions
whose answers are label words, scored as lm-eval-harness scores multiple choice: the
log-likelihood of each choice's tokens after the prompt, the highest wins. Free-text tasks
(`FREE_TEXT`: the debate speaker's surname; also the names of emoji from the vaderSentiment
sdist's lexicon, which a 135M model does not learn) are scored by exact match: the gold
answer is the greedy continuation (`greedy_match`).
Fine-tuning and the Fisher use the same prompts with the gold answer as the completion
(`epimer.curvature.causal_lm`: the loss on the answer's tokens only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epimer.bench import artifacts
from epimer.bench.data import TaskData, load_task
from epimer.cores import follow as follow_free_cores

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
#: free-text task -> instruction; the answer is the task's label name, generated.
FREE_TEXT: dict[str, str] = {
    "debate_speaker": "Who said this in a 2016 US presidential or vice-presidential debate? Answer with the surname.",
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


def free_text_task(data: TaskData) -> LLMTask:
    """A labelled-text task whose answer, the label's name, is generated (no choices given)."""
    prompts = tuple(f"{FREE_TEXT[data.name]}\nText: {_cut(t)}\nAnswer:" for t in data.texts)
    return LLMTask(data.name, prompts, tuple(data.label_names[y] for y in data.labels))


def llm_task(data: TaskData) -> LLMTask:
    """A labelled-text task as prompts: free text (`FREE_TEXT`) or multiple choice (`TEMPLATES`)."""
    return free_text_task(data) if data.name in FREE_TEXT else choice_task(data)


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
    return emoji_task() if name == EMOJI_TASK else llm_task(load_task(name))


def _plain_llama(model: torch.nn.Module) -> bool:
    """A Llama-style causal LM: ``model.model`` the decoder (embeddings fed straight to the
    blocks, no scaling), ``model.lm_head`` a linear output layer, no logit scaling."""
    cfg = getattr(model, "config", None)
    return (hasattr(model, "model") and isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
            and getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and getattr(cfg, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3", "smollm3"))


class _Stop(Exception):
    """Raised by the pre-hook of the first block that changes: the blocks below have run."""


class FrozenPrefix:
    """Scoring with the blocks below ``start`` frozen: their output is computed once per
    batch of token ids and reused, so a model whose merges change only the top blocks is
    scored for the price of those blocks.

    The cache holds, per batch of ids, the hidden states entering block ``start`` (captured by
    a forward pre-hook, the lower blocks' pass then stopped). Scoring runs the decoder with
    its blocks ``start:`` only on those states. It is exact for a Llama-style model: its blocks
    see only the hidden states, the causal mask and the positions, the same in both passes.
    The first batch is checked against the full forward pass, and the cache is dropped when
    any tensor below ``start`` (embeddings included) is modified in place (``_version``), so
    a stale prefix is never used."""

    def __init__(self, model: torch.nn.Module, start: int) -> None:
        if not _plain_llama(model):
            raise ValueError(f"FrozenPrefix needs a Llama-style causal LM; got {type(model).__name__}")
        layers = model.model.layers  # type: ignore[union-attr]
        if not 0 < start < len(layers):
            raise ValueError(f"start must be in 1..{len(layers) - 1}; got {start}")
        self.model, self.start = model, start
        self._below = [p for p in model.model.embed_tokens.parameters()]  # type: ignore[union-attr]
        self._below += [p for layer in layers[:start] for p in layer.parameters()]
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._versions = self._state()
        self._checked = False

    def _state(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._below)

    def _entering(self, ids: torch.Tensor) -> torch.Tensor:
        if self._state() != self._versions:  # a lower block changed: nothing cached is valid
            self._cache.clear()
            self._versions = self._state()
        key = (tuple(ids.shape), hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest())
        if key not in self._cache:
            seen: list[torch.Tensor] = []

            def grab(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                seen.append(args[0] if args else kwargs["hidden_states"])
                raise _Stop

            handle = self.model.model.layers[self.start].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                self.model.model(input_ids=ids, use_cache=False)  # type: ignore[operator]
            except _Stop:
                pass
            finally:
                handle.remove()
            self._cache[key] = seen[0].detach()
        return self._cache[key]

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states (after the final norm) for right-padded ``ids``."""
        decoder = self.model.model
        entering = self._entering(ids)
        full = decoder.layers  # type: ignore[union-attr]
        decoder.layers = torch.nn.ModuleList(list(full)[self.start:])  # type: ignore[union-attr]
        try:
            out = decoder(inputs_embeds=entering, use_cache=False).last_hidden_state  # type: ignore[operator]
        finally:
            decoder.layers = full  # type: ignore[union-attr]
        if not self._checked:
            reference = decoder(input_ids=ids, use_cache=False).last_hidden_state  # type: ignore[operator]
            gap = float((out - reference).abs().max())
            if gap > 1e-4 * max(1.0, float(reference.abs().max())):
                raise RuntimeError(f"FrozenPrefix: the top blocks on cached inputs differ from the full pass by "
                                   f"{gap:.2e}; this model cannot be scored with a frozen prefix")
            self._checked = True
        return out


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              prefix: FrozenPrefix | None = None) -> torch.Tensor:
    """The logits at positions ``(rows[k], cols[k])`` of a causal LM's output, (K, V).

    A Llama-style model runs its decoder (the top blocks only, with ``prefix``) and applies the
    output layer at those positions only: with a 49k-word vocabulary the full logits cost more
    than the decoder on CPU. Other models take their full logits."""
    if prefix is not None:
        return model.lm_head(prefix.hidden(input_ids)[rows, cols])  # type: ignore[operator]
    if not _plain_llama(model):
        return model(input_ids=input_ids).logits[rows, cols]
    hidden = model.model(input_ids=input_ids).last_hidden_state  # type: ignore[operator]
    return model.lm_head(hidden[rows, cols])  # type: ignore[operator]


def pad_id(tokenizer: object) -> int:
    """The padding token: the tokenizer's pad token, else its end of sequence, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices with similar lengths (sorted, longest first): padding, and so the
    work spent on it, stays small. Callers put each result back at its index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def choice_loglik(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], choices: Sequence[str],
                  batch_size: int = 16, prefix: FrozenPrefix | None = None) -> torch.Tensor:
    """(N, C) log-likelihood of each choice's tokens (with a leading space) after each prompt:
    Σ_t log p(choice token t | prompt, earlier choice tokens), as lm-eval-harness scores
    multiple choice. Sequences are right-padded; a causal model's outputs at a position
    depend only on earlier ones, so padding changes nothing. ``prefix``: the model's lower
    blocks are frozen and cached (`FrozenPrefix`)."""
    device = next(model.parameters()).device
    tails = [list(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in choices]  # type: ignore
    if all(len(t) == 1 for t in tails):  # one token a choice: one forward of each prompt scores them all
        return _single_token_loglik(model, tokenizer, prompts, [t[0] for t in tails], batch_size, device, prefix)
    rows: list[tuple[list[int], int]] = []  # (token ids, where the choice starts)
    for p in prompts:
        head = list(tokenizer(p, add_special_tokens=True)["input_ids"])  # type: ignore[operator]
        for c in choices:
            tail = list(tokenizer(" " + c, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
            rows.append((head + tail, len(head)))
    out = torch.empty(len(rows), dtype=torch.float64)
    for batch in by_length([len(r) for r, _ in rows], batch_size):
        chunk = [rows[i] for i in batch]
        logits, which, targets = _target_logits(model, chunk, device, prefix)
        picked = torch.log_softmax(logits.double(), dim=-1)[torch.arange(len(targets)), targets].cpu()
        out[batch] = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, which.cpu(), picked)
    return out.reshape(len(prompts), len(choices))


def _target_logits(model: torch.nn.Module, chunk: Sequence[tuple[list[int], int]], device: torch.device,
                   prefix: FrozenPrefix | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows ``(token ids, where the target starts)``, right-padded into one batch: the
    logits predicting each target token (K, V), the row of each (K,) and the targets (K,)."""
    ids = torch.zeros(len(chunk), max(len(r) for r, _ in chunk), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (r, begin) in enumerate(chunk):
        ids[i, : len(r)] = torch.tensor(r)
        rows += [i] * (len(r) - begin)
        cols += list(range(begin - 1, len(r) - 1))  # position t predicts token t + 1
        targets += r[begin:]
    which = torch.tensor(rows, device=device)
    logits = logits_at(model, ids.to(device), which, torch.tensor(cols, device=device), prefix)
    return logits, which, torch.tensor(targets, device=device)


def _single_token_loglik(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], tokens: list[int],
                         batch_size: int, device: torch.device, prefix: FrozenPrefix | None) -> torch.Tensor:
    heads = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]  # type: ignore[operator]
    out = torch.empty(len(prompts), len(tokens), dtype=torch.float64)
    for batch in by_length([len(h) for h in heads], batch_size):
        chunk = [heads[i] for i in batch]
        ids = torch.zeros(len(chunk), max(len(h) for h in chunk), dtype=torch.long)
        for i, h in enumerate(chunk):
            ids[i, : len(h)] = torch.tensor(h)
        last = torch.tensor([len(h) - 1 for h in chunk], device=device)
        logits = logits_at(model, ids.to(device), torch.arange(len(chunk), device=device), last, prefix)  # (B, V)
        logp = torch.log_softmax(logits.double(), dim=-1)
        out[batch] = logp[:, tokens].cpu()
    return out


def choice_accuracy(model: torch.nn.Module, tokenizer: object, task: LLMTask, batch_size: int = 16,
                    prefix: FrozenPrefix | None = None) -> float:
    scores = choice_loglik(model, tokenizer, task.prompts, task.choices, batch_size, prefix)
    gold = torch.tensor([task.choices.index(a) for a in task.answers])
    return float((scores.argmax(dim=1) == gold).double().mean())


@torch.no_grad()
def greedy_match(model: torch.nn.Module, tokenizer: object, task: LLMTask, batch_size: int = 16,
                 prefix: FrozenPrefix | None = None) -> float:
    """Exact match of the free-text answer, as lm-eval-harness's ``is_greedy`` (LAMBADA's
    accuracy): the share of prompts for which the gold answer's tokens (with a leading space,
    then the end of sequence, as the model was fine-tuned to answer) are the model's most
    likely token at every step. Greedy decoding then produces exactly the gold answer and
    stops; one forward pass of prompt + answer scores it, no generation loop."""
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    rows: list[tuple[list[int], int]] = []
    for p, a in zip(task.prompts, task.answers):
        head = list(tokenizer(p, add_special_tokens=True)["input_ids"])  # type: ignore[operator]
        tail = list(tokenizer(" " + a, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        rows.append((head + tail + ([int(eos)] if eos is not None else []), len(head)))
    hits = 0
    for batch in by_length([len(r) for r, _ in rows], batch_size):
        chunk = [rows[i] for i in batch]
        logits, which, targets = _target_logits(model, chunk, device, prefix)
        wrong = (logits.argmax(dim=-1) != targets).long()
        misses = torch.zeros(len(chunk), dtype=torch.long, device=device).index_add_(0, which, wrong)
        hits += int((misses == 0).sum())
    return hits / max(1, len(task))


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str], max_new_tokens: int = 12,
                   batch_size: int = 16) -> list[str]:
    """Each prompt's greedy continuation up to its first line break (special tokens dropped)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    heads = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]  # type: ignore[operator]
    answers = [""] * len(heads)
    for batch in by_length([len(h) for h in heads], batch_size):
        chunk = [heads[i] for i in batch]
        width = max(len(h) for h in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, h in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[i, width - len(h):] = torch.tensor(h)
            mask[i, width - len(h):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),  # type: ignore[operator]
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for i, row in zip(batch, out[:, width:]):
            text = tokenizer.decode(row, skip_special_tokens=True)  # type: ignore[attr-defined]
            answers[i] = text.split("\n")[0].strip()
    return answers


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the batch's sequences of each one's mean target-token loss: the per-sample
    loss of the Fisher (`epimer.curvature.causal_lm.CausalLMLoss`), averaged."""
    from epimer.curvature.causal_lm import IGNORE

    ids = batch["input_ids"]
    target = batch["labels"][:, 1:]
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)  # position t predicts token t + 1
    logits = logits_at(model, ids, rows, cols)  # (K, V): the target positions only
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = -torch.log_softmax(logits, dim=-1).gather(1, target[rows, cols].unsqueeze(1)).squeeze(1)
    per_row = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    count = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
    return (per_row / count.clamp(min=1)).mean()


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
    pad = pad_id(tokenizer)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        follow_free_cores()
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
