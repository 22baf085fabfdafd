"""File helpers shared by every layer: the one home of atomic writes and file hashes.

Dependency-free (standard library only), so every package, serving/ included, may use it. A writer that needs
a path (torch.save, onnx.save_model, PIL, numpy) takes `atomic_path`; one that writes a stream takes
`atomic_open`; small payloads take `atomic_write_bytes`, `atomic_write_text` or `atomic_write_json`. In each,
readers see either the old file or the whole new one: the bytes go to a temporary file beside the target, are
flushed to disk, and the temporary file is renamed over the target. A failed write leaves the target as it was
and no temporary file behind, and its OSError names the target, not the temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's files are 0600


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _renamed_error(exc: OSError, tmp: Path, path: Path) -> OSError:
    """The OSError to raise: one that named our temporary file names the user's file instead."""
    if exc.errno is not None and exc.filename in (None, str(tmp)):
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (created if missing) for the caller to write; when the block
    ends without an error, the file is flushed to disk and renamed over `path`. Otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:  # a folder that is read-only, or not a folder: name the user's file
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        new = _renamed_error(exc, tmp, path)
        if new is exc:
            raise
        raise new from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


PROBE_BYTES = 1 << 16  # written and synced by `check_writable`: a full disk refuses it


def check_writable(path: str | Path) -> None:
    """Before long work that ends by writing `path`: OSError naming `path` now if a file cannot be written
    there (its folder cannot be made, is read-only or not a folder, or the disk is full). A probe file
    of `PROBE_BYTES`, synced to disk, is written beside it and removed. The write itself is still checked."""
    path = Path(path)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as exc:
        _remove_empty(made)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
        os.unlink(name)
        _remove_empty(made)  # the write makes them again: a command that fails before it leaves nothing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO]:
    """`open(path, mode)` for writing, atomically: the file appears under `path` whole, when the block ends
    without an error (`mode` is "wb" or "w")."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', not {mode!r}")
    with atomic_path(path, suffix=suffix) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON (indented, keys sorted, one trailing newline), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


LOCK_NAME = ".nvae.lock"


class FolderLock:
    """An exclusive lock on a folder that one process writes (a training run's --out): `fcntl.flock` on
    `<folder>/.nvae.lock`, which the OS releases when the process dies, however it dies. The file holds the
    holder's PID and command, so a second writer's error can name it. `with FolderLock(path, "train"):`."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what
        self._fh = None

    def __enter__(self) -> FolderLock:
        import fcntl

        from common.errors import NVAEError

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fh = open(self.folder / LOCK_NAME, "a+")
        except PermissionError:  # a run we may write into but whose lock file is another user's: flock reads
            fh = open(self.folder / LOCK_NAME)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise NVAEError(
                f"{self.folder} is in use by {holder}; wait for it to end, or use another folder"
            ) from None
        if fh.writable():
            fh.seek(0)
            fh.truncate()
            fh.write(f"PID {os.getpid()} ({self.what})\n")
            fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None


def enclosing_run(path: str | Path) -> Path | None:
    """The run folder (one that holds `.nvae.lock`, as `nvae train` leaves it) that `path` is or lies in,
    nearest first; None when it lies in no run."""
    resolved = Path(path).resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / LOCK_NAME).is_file():
            return folder
    return None


@contextlib.contextmanager
def run_locks(paths: list[str | Path], what: str) -> Iterator[None]:
    """Hold the lock of every run that one of `paths` (what a command writes) lies in, for as long as the
    block runs: a command that writes into a training run waits for no one and is refused, naming the holder,
    while `nvae train` or another writer holds it. Paths outside any run take no lock and leave no file."""
    with contextlib.ExitStack() as stack:
        for folder in sorted({run for run in map(enclosing_run, paths) if run is not None}):
            stack.enter_context(FolderLock(folder, what))
        yield
