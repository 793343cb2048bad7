"""Where outputs go: checked before any work, and a write that fails while the work runs
reported in one line, with the half-written files removed.

Every command that writes calls `check_output` on its output folder before it reads a
weight: a path under a file, a folder it cannot create (read-only file system, no
permission, ``/proc``), an existing folder or a file in its place is refused with exit
code 2, naming the path, the problem and the fix. The check creates (and removes) an empty
folder where the output will go, so it asks the file system itself, for root as for anyone.

Writing can still fail later: the disk fills up, a file outgrows the size limit
(``ulimit -f``, FAT32's 4 GB), the file system is remounted read-only. `writing` turns
such a failure into one `WriteFailed` line (exit code 74): what failed, how much was
written, how much space is left, what was removed or kept, and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from moekit.errors import MoekitError, WriteFailed

# The errors only a write gives, whatever file they name: what each means, and the fix.
_ELSEWHERE = "choose an output folder on another disk with -o"
_WRITE_ERRORS = {
    errno.ENOSPC: ("the disk is full", f"Free space there, or {_ELSEWHERE}."),
    errno.EDQUOT: ("the disk quota is used up", f"Free space within your quota, or {_ELSEWHERE}."),
    errno.EFBIG: ("a file outgrew the largest size allowed",
                  f"Raise the limit (ulimit -f; the file system's largest file), or {_ELSEWHERE}."),
    errno.EROFS: ("the file system is read-only", "Choose an output folder you can write with -o."),
}
# These mean a failed write only for a file of the output (reading an input can give them too).
_OWN_FILE_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
_SHORT_WRITE = ("a write stopped short: the disk is probably full", f"Free space there, or {_ELSEWHERE}.")


def check_output(out_dir: str | os.PathLike, *, run_folder: bool = False) -> Path:
    """The absolute path of the new output folder ``out_dir``, once it is clear that it can
    be created: refused (`MoekitError`, one line) when it exists, when a file stands in its
    way, or when the folder that will hold it does not take new files.

    Args:
        run_folder: ``out_dir`` may already be a folder, which moekit writes into (a
            training run's, which a rerun resumes); it must then be writable itself.
    """
    out = Path(out_dir).expanduser().resolve()
    if _exists(out):
        if not out.is_dir():
            raise MoekitError(f"{out} is a file; moekit writes its output as a new folder. Choose another path "
                              "with -o.")
        if not run_folder:
            raise MoekitError(f"{out} already exists; moekit never writes into an existing folder. Choose a new one "
                              "with -o.")
        _probe(out, out)
        return out
    holder = out.parent
    while not _exists(holder):  # the folders moekit will create on the way, and the first that exists
        holder = holder.parent
    if not holder.is_dir():
        raise MoekitError(f"cannot create {out}: {holder} is a file, not a folder. Choose another path with -o.")
    _probe(holder, out)
    return out


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:  # a folder on the way that may not be searched: what `_probe` reports
        return True


def _probe(folder: Path, out: Path) -> None:
    """Create and remove an empty folder in ``folder``: the file system's own answer (the
    mode bits say nothing for root, nor for a read-only mount)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moekit-probe-", dir=folder))
    except OSError as exc:
        why = {errno.EROFS: f"{folder} is on a read-only file system",
               errno.EACCES: f"no permission to create folders in {folder}",
               errno.EPERM: f"no permission to create folders in {folder}",
               errno.ENOSPC: f"the disk holding {folder} is full",
               errno.EDQUOT: f"the disk quota for {folder} is used up"}.get(exc.errno, f"{folder} takes no new folders")
        fix = "Free space there, or choose" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "Choose"
        raise MoekitError(f"cannot create {out}: {why} ({exc.strerror}). {fix} a folder you can write with -o.") \
            from None


def write_error(exc: BaseException, out: Path | None = None) -> tuple[str, str] | None:
    """(what went wrong, the fix) when ``exc`` is a failed write, in words; None when it is
    not one. ``out``: the output folder, whose own files may also fail for permissions."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        # safetensors (Rust) raises its own type: "Error while serializing: I/O error: ... (os error 28)"
        found = re.search(r"I/O error: .*\(os error (\d+)\)", text)
        code = int(found.group(1)) if found else None
    if code in _WRITE_ERRORS:
        reason, fix = _WRITE_ERRORS[code]
        return f"{reason} ({os.strerror(code)})", fix
    if code in _OWN_FILE_ERRORS and out is not None and _of_output(getattr(exc, "filename", None), out):
        return f"{_OWN_FILE_ERRORS[code]} ({os.strerror(code)})", "Choose an output folder you can write with -o."
    if isinstance(exc, OSError) and code is None and re.search(r"\d+ requested and \d+ written", text):
        return _SHORT_WRITE  # numpy's tofile says no more
    return None


def _of_output(filename: object, out: Path) -> bool:
    """Whether ``filename`` is the output folder, in it, or one of its hidden companions
    (``.OUT.partial-*``, ``.OUT.moekit-work``)."""
    if not filename:
        return False
    path = Path(os.fsdecode(filename)).absolute()
    if path == out or out in path.parents:
        return True
    first = path.relative_to(out.parent).parts[0] if out.parent in path.parents else ""
    return first.startswith(f".{out.name}.")


@contextlib.contextmanager
def writing(out: Path, *, partial: Sequence[Path] = (), on_failure: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn a write into ``out`` that fails inside the block into one `WriteFailed` line.

    Args:
        partial: what the block writes (measured when it fails: "N written").
        on_failure: called when a write failed, before the error is raised: removes or
            keeps what was written and says which, in a sentence (a `WriteFailed` from
            an inner block gets it too).
    """
    try:
        yield
    except WriteFailed as exc:
        if on_failure is not None and (note := on_failure()):
            exc.notes.append(note)
        raise
    except Exception as exc:
        found = write_error(exc, out)
        if found is None:
            raise
        reason, fix = found
        facts = [f"{size_text(sum(folder_size(p) for p in partial))} written"] if partial else []
        if (free := free_space(out)) is not None:
            facts.append(f"{size_text(free)} free when it failed")
        failed = WriteFailed(f"could not write {out}: {reason}" + (f"; {', '.join(facts)}" if facts else "") + ".",
                             fix)
        if on_failure is not None and (note := on_failure()):
            failed.notes.append(note)
        raise failed from exc


def failed_write(exc: BaseException) -> str | None:
    """A failed write outside any output folder (a temporary file), as one line; None when
    ``exc`` is not one. The CLI's last resort: outputs are handled by `writing`."""
    found = write_error(exc)
    if found is None:
        return None
    where = getattr(exc, "filename", None)
    return (f"could not write {os.fsdecode(where) if where else 'a temporary file'}: {found[0]}. moekit's temporary "
            f"files go to {tempfile.gettempdir()}: make room there, or set TMPDIR to a writable folder with space, "
            "and run the command again.")


def remove_partial(folder: Path) -> None:
    """Delete the ``*.partial`` files and folders a failed write left in ``folder`` (every
    file moekit writes is written under that name and renamed when complete)."""
    for path in sorted(folder.rglob("*.partial"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def missing_folders(out: Path) -> list[Path]:
    """The folders above ``out`` that do not exist yet, deepest first: what creating it
    creates, and what a failed write should take away again."""
    missing = []
    for parent in out.parents:
        if _exists(parent):
            break
        missing.append(parent)
    return missing


def remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first; one holding anything else stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def folder_size(path: Path) -> int:
    """Bytes of the files in ``path`` (a file's own size; 0 when it is gone)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


def free_space(out: Path) -> int | None:
    """Bytes free for a user on the file system that holds (or will hold) ``out``."""
    holder = out
    while not _exists(holder) and holder != holder.parent:
        holder = holder.parent
    try:
        return shutil.disk_usage(holder).free
    except OSError:
        return None


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"
