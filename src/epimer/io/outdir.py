"""Safe output locations: never write over an input, find problems before any work, and put
a finished folder or file in place atomically.

Every command that writes (``merge``, ``fisher``, ``diagnose --json``) checks its output
here before it reads a single tensor:

- :func:`check_not_over_inputs` refuses an output that equals, contains or lies inside one of
  the inputs, or that is the working directory or one of its ancestors, so ``--overwrite``
  can never delete what the command reads;
- :func:`ensure_writable_folder` creates the folder that will hold the output and proves it
  writable with a real file (permission bits do not tell the whole story: read-only mounts,
  quotas, root);
- :func:`partial_name` gives the hidden name an output is built under, short enough for the
  file system's 255-byte name limit, and carrying the process id so that
  :func:`remove_stale_partials` can clear what a killed process left behind;
- :func:`rename_noreplace` and :func:`exchange` put the finished output in place: the first
  refuses an output that appeared meanwhile (two merges into one OUT), the second swaps old
  and new in one step, so no signal can leave OUT missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from epimer.errors import InputError

#: The longest prefix of OUT's name kept in the hidden name (file systems allow 255 bytes).
_NAME_KEEP = 100
_PARTIAL = ".partial-"


def _real(path: Path) -> Path:
    """The absolute path with symbolic links resolved (never raises on loops)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_over_inputs(out: Path, inputs: Iterable[tuple[str, Path]], what: str = "output") -> None:
    """Refuse an output that equals, contains or lies inside an input, or that is the working
    directory or one of its ancestors.

    Args:
        out: the output path.
        inputs: (description, path) of everything the command reads.
        what: how messages name the output (e.g. "-o OUT").
    """
    o = _real(out)
    cwd = _real(Path.cwd())
    if _inside(cwd, o):
        raise InputError(
            f"{out}: the {what} is the current directory or one of its parents ({cwd}); "
            "writing there could delete your files: choose a new folder"
        )
    for label, path in inputs:
        p = _real(path)
        if _inside(p, o) or _inside(o, p):
            rel = "is" if p == o else ("contains" if _inside(p, o) else "lies inside")
            raise InputError(
                f"{out}: the {what} {rel} the {label} {path}; choose a path apart from every input"
            )


def ensure_writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` (and its parents) if needed and prove that files can be made in it.

    Raises InputError naming the path: a parent that is a file, a read-only file system, no
    permission, no space.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise InputError(f"{folder}: cannot hold the {what}: {blocker} is a file, not a folder") from None
    except OSError as err:
        raise InputError(f"{folder}: cannot create the folder for the {what}: {err.strerror or err}") from None
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".epimer-write-test-"):
            pass
    except OSError as err:
        raise InputError(f"{folder}: cannot write the {what} here: {err.strerror or err}") from None


def os_error_message(err: OSError, path: Path, what: str) -> str:
    """One line for an OSError met while writing ``path`` (disk full, read-only, ...)."""
    where = err.filename or path
    return f"{where}: cannot write the {what}: {err.strerror or err}"


# ---------------------------------------------------------------------- hidden build names


def partial_name(out: Path) -> str:
    """Prefix of the hidden name OUT is built under: ``.NAME.partial-PID-``."""
    return f".{out.name[:_NAME_KEEP]}{_PARTIAL}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_partials(out: Path) -> Iterator[Path]:
    """Hidden build folders or files of OUT whose process no longer runs."""
    prefix = f".{out.name[:_NAME_KEEP]}{_PARTIAL}"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            yield p


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove what killed runs left beside OUT (their processes are gone); returns them."""
    removed = []
    for p in stale_partials(out):
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed


def default_mode(folder: bool) -> int:
    """The mode a new file (0666) or folder (0777) gets under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


# ---------------------------------------------------------------------- putting in place

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False when the system or file system does not offer it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (they are delivered after it)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # not the main thread, or no sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, refusing (InputError) if ``dst`` exists, even if it appeared
    a moment ago."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
        if not src.is_dir():  # no renameat2: a hard link fails if dst exists
            os.link(src, dst)
            os.unlink(src)
            return
        # A folder: claim the name with mkdir (atomic), then replace the empty folder.
        os.mkdir(dst)
        try:
            with signals_held():
                os.rename(src, dst)
        except BaseException:
            os.rmdir(dst)
            raise
    except FileExistsError:
        raise InputError(
            f"{dst}: output appeared while this run was working (another run?); "
            "nothing was replaced: choose another path or pass --overwrite"
        ) from None


def exchange(new: Path, out: Path) -> None:
    """Swap the finished ``new`` with the existing ``out`` atomically; afterwards ``new`` holds
    the old content (the caller removes it). Without renameat2, two renames with SIGINT and
    SIGTERM held between them."""
    if _renameat2(new, out, _RENAME_EXCHANGE):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name[:_NAME_KEEP]}.old-", dir=out.parent))
    with signals_held():
        os.rename(out, old / "content")
        os.rename(new, out)
        os.rename(old / "content", new)
    os.rmdir(old)


def write_atomic(path: Path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Write a file through a hidden temporary file beside it (``write`` fills it), fsync and a
    rename, with the mode the umask gives a new file (never the 0600 of a temporary file).
    An OSError (disk full, read-only) is an InputError naming ``path``; nothing is left."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_NAME_KEEP]}.", suffix=".tmp", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(folder=False))
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(os_error_message(err, path, what)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """A small UTF-8 text file, written as :func:`write_atomic` does."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), what)


def publish_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished folder ``tmp`` (built beside OUT) in place of OUT with the mode a new
    folder gets: with ``overwrite``, an atomic exchange with an existing OUT (whose old content
    is then removed); else a rename that refuses an OUT, even one that appeared meanwhile."""
    os.chmod(tmp, default_mode(folder=True))
    if overwrite and out.exists():
        exchange(tmp, out)  # tmp now holds the old output
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        rename_noreplace(tmp, out)


def discard_folder(tmp: Path, writer: object | None = None) -> None:
    """Abandon a folder being built: stop its writer's background I/O, remove it."""
    if writer is not None:
        writer.abort()  # type: ignore[attr-defined]
    shutil.rmtree(tmp, ignore_errors=True)

