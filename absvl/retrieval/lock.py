"""One writer at a time: the index's write lock (``flock`` on ``INDEX.lock``), taken by process 0 of a
process group for all of it. The OS drops the lock when its process dies: a crash never blocks."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from ..io import backup_of, recover_folder

logger = logging.getLogger(__name__)

LOCK_WAIT = 10.0  # seconds a reader waits for a writer to finish its swap before recovering it


class IndexLockedError(FileExistsError):
    """Another process is writing the index (it holds ``INDEX.lock``)."""


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    if process_group()[1] > 1:
        dist.barrier()


def lock_file(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.lock")


@contextlib.contextmanager
def index_lock(folder: str | Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the exclusive write lock of an index: ``flock`` on ``INDEX.lock`` beside the folder.

    Raises :class:`IndexLockedError` (naming the holder's pid) when another process still holds it
    after ``wait`` seconds. The file itself stays (deleting it would race with a process about to lock it).
    """
    folder = Path(os.path.abspath(folder))
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise IndexLockedError(
                        f"index {folder} is being written by another absvl process (pid {holder}); wait for it "
                        f"or remove the stale lock {path}"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def recover_swap(folder: Path) -> None:
    """Undo a folder swap a crash interrupted (call with the lock held): see :func:`absvl.io.recover_folder`."""
    if not folder.exists() and backup_of(folder).is_dir():
        logger.warning(
            "restoring %s from %s: a previous write was interrupted while swapping folders", folder, backup_of(folder)
        )
    recover_folder(folder)


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """The write lock for a build/add/rebuild, with any interrupted swap undone first.

    In a process group process 0 takes the lock and tells the others whether it got it, so all
    processes fail alike instead of the helpers waiting at a barrier.
    """
    rank, world = process_group()
    with contextlib.ExitStack() as stack:
        error: str | None = None
        if rank == 0:
            try:
                stack.enter_context(index_lock(folder))
                recover_swap(folder)
            except IndexLockedError as err:
                error = str(err)
        if world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise IndexLockedError(error)
        yield
