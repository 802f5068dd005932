"""Writing files and folders so that a crash or an error never leaves a half-written one, and content digests.

A file is written to a temporary sibling, flushed to disk and renamed over the target (`atomic_path`,
`write_atomic`). A folder of files (a model, a checkpoint, a batch case) is built in a private staging folder next
to its destination and swapped in by `staged_folder`: the previous folder is renamed aside, the new one renamed into
place, and the previous one deleted only then; if the second rename fails the previous folder is renamed back. Both
renames stay inside one parent folder, so they are atomic on one file system.

The staging and the moved-aside copy live one level down in a hidden work folder `.<name>-swap-<random>/` (`new`,
`old`), so listings that look for `*/model.json` never see a half-built or outgoing folder. A process killed between
the two renames leaves the previous folder in `old`: `interrupted_swap` finds it and the next `staged_folder` on the
same destination puts it back before it starts.

Temporary files are private (mkstemp, mkdtemp); what is published gets the modes any new file of the user would
have (`file_mode`, `folder_mode`), because models and results are meant to be shared.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
_CHUNK = 1 << 20
_NEW, _OLD = "new", "old"


# ----------------------------------------------------------------------------------------------- modes
def umask() -> int:
    """The process's umask (POSIX has no call that reads it without setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


def make_shareable(path: PathLike) -> None:
    """Give a file, or a folder and everything under it, the modes a newly created one would have."""
    path = Path(path)
    if not path.is_dir():
        os.chmod(path, file_mode())
        return
    fmode, dmode = file_mode(), folder_mode()
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, dmode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), fmode)


# ----------------------------------------------------------------------------------------------- durability
def fsync_file(path: PathLike) -> None:
    # r+b: Windows refuses to flush a handle opened read-only.
    with open(path, "r+b") as fh:
        os.fsync(fh.fileno())


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside `folder` durable. Windows cannot open a folder for this, and needs no such step."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- single files
@contextmanager
def atomic_path(path: PathLike, suffix: Optional[str] = None) -> Iterator[Path]:
    """A temporary path next to `path` to write to (by any writer: SimpleITK, numpy, matplotlib, ...); when the
    block ends normally it is flushed, given the usual file mode and renamed to `path`, else removed. `suffix`
    (default: the target's) is kept because several writers choose the format by it."""
    path = Path(path)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write `data` (str as UTF-8) to `path` through a temporary sibling: readers see the old or the new file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------------------------- folders
def _work_folders(folder: Path):
    return sorted(folder.parent.glob(f".{folder.name}-swap-*"))


def interrupted_swap(folder: PathLike) -> Optional[Path]:
    """When `folder` is missing because a swap was killed between its two renames, the previous folder (moved
    aside and complete); else None."""
    folder = Path(folder)
    if os.path.lexists(folder):
        return None
    for work in reversed(_work_folders(folder)):
        if (work / _OLD).is_dir():
            return work / _OLD
    return None


def _recover(folder: Path) -> None:
    """Put back a folder moved aside by a swap that never finished, then drop the leftovers of such swaps."""
    previous = interrupted_swap(folder)
    if previous is not None:
        os.replace(previous, folder)
    for work in _work_folders(folder):
        shutil.rmtree(work, ignore_errors=True)


def swap_in(staged: Path, folder: Path, aside: Path) -> None:
    """Replace `folder` by the finished folder `staged`; `aside` (a free path on the same file system) holds the
    previous one until the new one is in place, and it is renamed back if that fails."""
    moved = False
    if os.path.lexists(folder):
        os.replace(folder, aside)  # rename cannot replace a non-empty folder
        moved = True
    try:
        os.replace(staged, folder)
    except BaseException:
        if moved:
            os.replace(aside, folder)
        raise
    fsync_folder(folder.parent)


@contextmanager
def staged_folder(folder: PathLike, shareable: bool = True) -> Iterator[Path]:
    """An empty private folder to build the new content of `folder` in; when the block ends normally every file
    is flushed, the modes are made shareable (unless `shareable` is False) and the folder swapped in, replacing
    any previous one. On an error in the block, or in the swap, the previous `folder` stays as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _recover(folder)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-swap-", dir=folder.parent))
    try:
        stage = work / _NEW
        stage.mkdir()
        yield stage
        for dirpath, _, filenames in os.walk(stage):
            for name in filenames:
                fsync_file(os.path.join(dirpath, name))
        if shareable:
            make_shareable(stage)
        swap_in(stage, folder, work / _OLD)
    finally:
        if (work / _OLD).is_dir() and not os.path.lexists(folder):
            # Neither the swap nor its undo went through: the previous folder stays in `old` for `_recover`.
            shutil.rmtree(work / _NEW, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def replace_folder(staged: PathLike, folder: PathLike, shareable: bool = True) -> Path:
    """Install the finished folder `staged` (on the same file system, e.g. unpacked and checked in a staging
    area) as `folder`, replacing any previous one, with the guarantees of `staged_folder`."""
    folder = Path(folder)
    with staged_folder(folder, shareable) as stage:
        stage.rmdir()
        os.replace(staged, stage)
    return folder


# ----------------------------------------------------------------------------------------------- digests
def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: PathLike) -> str:
    """One sha256 over every file of a folder (relative names and contents); the registry's model checksum."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()
