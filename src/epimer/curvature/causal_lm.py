"""Per-sample curvature of a causal language model (docs/method.md §4, causal LMs).

A sample is one sequence and its per-sample loss the mean next-token cross-entropy over its
*target* tokens, in one of three data shapes (one JSON object per line):

- ``{"text": ...}``: every token after the first is a target;
- ``{"prompt": ..., "completion": ...}``: the prompt's tokens (with the tokenizer's special
  tokens) followed by the completion's (without them) and the end-of-sequence token; the
  targets are the completion's tokens and the end-of-sequence token;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the conversation rendered by the
  tokenizer's chat template; the targets are the tokens of the assistant turns. An assistant
  turn's tokens are found exactly as the difference between the template rendered up to the
  turn with the generation prompt and rendered through the turn; a template that does not
  render a conversation as a prefix of its continuation is refused, never approximated.

Sequences are never packed: each sample is its own row, right-padded in its batch. A causal
model's outputs at a position depend only on earlier positions, so padding after the last
token changes nothing before it, and no attention mask is needed (vmap could not trace the
data-dependent mask handling of some models either). ``estimator="true"`` draws each target
token from the model's predictive distribution at its position (the inputs stay the data's
tokens), one generator per sample seeded from ``(seed, sample index)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epimer.curvature.fisher import Batch, Forward, _sample_generator
from epimer.errors import InputError

IGNORE = -100
SHAPES = ("text", "prompt + completion", "messages")


@dataclass(frozen=True)
class Tokenized:
    """One tokenised sample: its token ids and, per position, the target id or IGNORE."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def shape_of(row: Mapping[str, Any], where: str) -> str:
    """Which of the three data shapes a JSON object is; refuses none or more than one."""
    has = [s for s, keys in (("text", ("text",)), ("prompt + completion", ("prompt", "completion")),
                             ("messages", ("messages",))) if all(k in row for k in keys)]
    if len(has) != 1:
        found = ", ".join(map(repr, row)) or "none"
        what = "more than one of" if has else "none of"
        raise InputError(f"{where}: a causal-LM sample holds exactly one of `text`, `prompt` + `completion` or "
                         f"`messages`; this one holds {what} them (fields: {found})")
    return has[0]


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, Mapping):  # some versions return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_sample(row: Mapping[str, Any], tokenizer: Any, max_length: int, where: str) -> Tokenized:
    """Token ids and per-position targets of one sample (see the module docstring)."""
    shape = shape_of(row, where)
    if shape == "text":
        text = _text(row, "text", where)
        ids = _ids(tokenizer, text, True)
        targets = [True] * len(ids)
    elif shape == "prompt + completion":
        prompt, completion = _text(row, "prompt", where), _text(row, "completion", where)
        p, c = _ids(tokenizer, prompt, True), _ids(tokenizer, completion, False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = p + c + eos
        targets = [False] * len(p) + [True] * (len(c) + len(eos))
    else:
        ids, targets = _chat(row["messages"], tokenizer, where)
    ids, targets = ids[:max_length], targets[:max_length]
    labels = [i if (t and pos > 0) else IGNORE for pos, (i, t) in enumerate(zip(ids, targets))]
    if all(label == IGNORE for label in labels):
        raise InputError(f"{where}: no target token within the first {max_length} tokens (max_length); "
                         "raise it or shorten the sample's prompt")
    return Tokenized(tuple(ids), tuple(labels))


def _text(row: Mapping[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} is {type(value).__name__}, expected text")
    return value


def _chat(messages: Any, tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise InputError(f"{where}: `messages` must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                         "objects with text values")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(f"{where}: the model's tokenizer has no chat template, so `messages` cannot be rendered; "
                         "use `text` or `prompt` + `completion` samples")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise InputError(f"{where}: no assistant turn in `messages`: the loss is on assistant turns only")
    full = _chat_ids(tokenizer, messages, False)
    targets = [False] * len(full)
    for i in turns:
        before = _chat_ids(tokenizer, messages[:i], True) if i > 0 else None
        through = _chat_ids(tokenizer, messages[: i + 1], False)
        start = len(before) if before is not None else 0
        if (before is not None and through[:start] != before) or full[: len(through)] != through:
            raise InputError(f"{where}: the tokenizer's chat template does not render the conversation up to turn "
                             f"{i + 1} as a prefix of the whole, so its assistant tokens cannot be told exactly; "
                             "give the sample as `prompt` + `completion` instead")
        for pos in range(start, len(through)):
            targets[pos] = True
    return full, targets


def batches(samples: Sequence[Tokenized], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "labels"}`` (labels IGNORE on padding); each row
    one sample, never packed."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        length = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
            labels[row, : len(s.labels)] = torch.tensor(s.labels)
        yield {"input_ids": ids, "labels": labels}


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclass(frozen=True)
class CausalLMLoss:
    """Per-sample loss of a causal LM: the mean over the sample's target positions t of
    ``−log p(y_t | x_<t)``, with y_t = ``labels[t]`` (IGNORE: not a target)."""

    def __call__(self, forward: Forward, sample: Batch) -> torch.Tensor:
        ids = sample["input_ids"]
        logits = _logits(forward(input_ids=ids.unsqueeze(0)))[0, :-1]  # (L-1, V): predicts positions 1..L-1
        target = sample["labels"][1:]
        keep = target != IGNORE
        logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        nll = -logp.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
        return (nll * keep).sum() / keep.sum()

    def sample_targets(self, model: Any, batch: Batch, *, seed: int, first_index: int) -> dict[str, torch.Tensor]:
        """The batch with each target token drawn from the model's predictive distribution
        at its position (``estimator="true"``); sample n's draws depend only on
        ``(seed, first_index + n)``."""
        with torch.no_grad():
            logits = _logits(model(input_ids=batch["input_ids"]))  # (B, L, V)
        probs = torch.softmax(logits[:, :-1].detach().to(torch.float64), dim=-1).cpu()
        labels = batch["labels"].clone()
        for n in range(labels.shape[0]):
            where = (labels[n, 1:] != IGNORE).nonzero().squeeze(1).cpu()
            if len(where):
                g = _sample_generator(seed, first_index + n)
                draws = torch.multinomial(probs[n, where], 1, generator=g).squeeze(1)
                labels[n, where + 1] = draws.to(labels.device)
        return {**batch, "labels": labels}


causal_lm_loss = CausalLMLoss()

