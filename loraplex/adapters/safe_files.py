"""Paths and files that clients name: checked as text, confined to the adapter roots, bounded.

A client may register any adapter directory inside the allowed roots, and the roots may hold
links. Checking only the directory is not enough: a file in it can be a link to an adapter, or
to any JSON file, outside every root. So each file is resolved (all links followed), must lie
inside a root, and is opened on that resolved path with O_NOFOLLOW; where /proc exists, the
opened descriptor's real path is checked again, so a directory swapped for a link between the
check and the open is caught too. `roots=None` means trusted (the operator's --adapter): links
are followed freely, as in a Hugging Face cache snapshot.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX: the longest file name most file systems take
_PROC_FD = Path("/proc/self/fd")


class BadPathError(ValueError):
    """A path that is malformed or names something other than a plain file (HTTP 400)."""


class OutsideRootsError(ValueError):
    """A path, or a file inside it, that resolves outside every allowed root (HTTP 403)."""


def check_path_text(path: str) -> None:
    """Refuse paths no file system call should see: NUL bytes, over-long paths or names."""
    if not isinstance(path, str) or not path:
        raise BadPathError("the path must be a non-empty string")
    if "\x00" in path:
        raise BadPathError("the path contains a NUL byte")
    for part in path.split(os.sep):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise BadPathError(f"a component of the path is longer than {MAX_NAME_BYTES} bytes")
    if len(path) > MAX_PATH_CHARS:
        raise BadPathError(f"the path is {len(path)} characters long, more than {MAX_PATH_CHARS}")


def is_inside(real: Path, roots: Sequence[Path]) -> bool:
    """Whether the resolved path `real` is one of `roots` (resolved) or below one."""
    return any(real == root or root in real.parents for root in roots)


def resolve_inside(path: str | os.PathLike, roots: Sequence[Path]) -> Path:
    """The real path of `path` (every link followed); OutsideRootsError unless inside a root."""
    check_path_text(os.fspath(path))
    # os.path.realpath, not Path.resolve: the latter raises RuntimeError on a link loop
    real = Path(os.path.realpath(path))
    if not is_inside(real, roots):
        raise OutsideRootsError(f"path {os.fspath(path)!r} is outside the allowed adapter roots")
    return real


@dataclass
class OpenFile:
    """A plain file opened for reading; close it (or use it as a context manager)."""

    fd: int
    size: int
    real: Path  # the path it was opened by

    def read(self) -> bytes:
        chunks, left = [], self.size
        while left > 0:
            chunk = os.read(self.fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def path_for_library(self) -> str:
        """A name that opens exactly this file, for libraries that take names (safetensors)."""
        proc = _PROC_FD / str(self.fd)
        return str(proc) if proc.exists() else str(self.real)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_file(path: Path, roots: Sequence[Path] | None, max_bytes: int) -> OpenFile:
    """Open `path` for reading: a plain file of at most `max_bytes`, inside `roots` unless None.

    Raises BadPathError, OutsideRootsError, or OSError (the file cannot be opened).
    """
    label = path.name
    real = path
    # O_NONBLOCK: opening a FIFO named like an adapter file must not hang the reader
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    if roots is not None:
        real = Path(os.path.realpath(path))
        if not is_inside(real, roots):
            raise OutsideRootsError(f"{label} is a link to a file outside the allowed adapter roots")
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(real, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadPathError(f"{label} is not a regular file")
        if info.st_size > max_bytes:
            raise BadPathError(f"{label} is {info.st_size} bytes, larger than the limit of {max_bytes} bytes")
        if roots is not None:
            _check_opened_inside(fd, label, roots)
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, info.st_size, real)


def _check_opened_inside(fd: int, label: str, roots: Sequence[Path]) -> None:
    # where the descriptor really points, whatever happened to the path since realpath
    try:
        opened = Path(os.readlink(_PROC_FD / str(fd)))
    except OSError:
        return  # no /proc here: the realpath check above stands alone
    if not is_inside(opened, roots):
        raise OutsideRootsError(f"{label} is a link to a file outside the allowed adapter roots")


def check_files_inside(directory: Path, names: Sequence[str], roots: Sequence[Path]) -> None:
    """Each of `names` in `directory` that exists must resolve inside a root (links included)."""
    for name in names:
        path = directory / name
        if os.path.lexists(path) and not is_inside(Path(os.path.realpath(path)), roots):
            raise OutsideRootsError(f"{name} is a link to a file outside the allowed adapter roots")
