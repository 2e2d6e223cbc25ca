"""One writer at a time: the index's write lock (``flock`` on ``INDEX.lock``), taken by process 0 of a
process group for all of it.

The OS drops the lock when its process dies, so a dead writer's lock is taken over by the next one
(the ``flock`` is the takeover: atomic, no file is deleted). A lock that is refused is held by a
living process and is never called stale. The file itself is never deleted: a writer that finds
its lock file deleted or replaced (so another writer may have taken the index meanwhile) stops
without publishing anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from ..io import backup_of, recover_folder

logger = logging.getLogger(__name__)

LOCK_WAIT = 10.0  # seconds a reader waits for a writer to finish its swap before recovering it
_HOLDER_BYTES = 512  # the holder record: "PID HOST SINCE"


class IndexLockedError(FileExistsError):
    """Another process is writing the index (it holds ``INDEX.lock``), or this writer lost its lock."""


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


# --------------------------------------------------------------------------- the holder
def _holder_record() -> str:
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"{os.getpid()} {socket.gethostname()} {since}\n"


def _parse_holder(text: str) -> tuple[int | None, str | None, str | None]:
    """(pid, host, since) of a lock file's record (its first line); older absvl wrote the pid alone."""
    lines = text.splitlines()
    parts = lines[0].split() if lines else []
    try:
        pid = int(parts[0]) if parts else None
    except ValueError:
        pid = None
    return pid, (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else None)


def _process_state(pid: int) -> str | None:
    """``"running"``, ``"stopped"`` (SIGSTOP, Ctrl-Z) or None when no process ``pid`` exists here."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat[stat.rindex(")") + 2 :].split()[0]
    except (OSError, ValueError, IndexError):
        return "running"
    if state == "Z":
        return None  # a zombie holds no files
    return "stopped" if state in ("T", "t") else "running"


def _held_message(folder: Path, path: Path, record: str) -> str:
    """Why the lock was refused: its holder is alive (this host), or runs elsewhere; never 'stale'."""
    pid, host, since = _parse_holder(record)
    when = f" since {since}" if since else ""
    release = (
        f"the lock {path} is not stale: the OS releases it the moment that process exits, and the next "
        "writer takes it over"
    )
    if pid is None:
        return f"index {folder} is being written by another process (it has not recorded its pid yet); wait for it to finish ({release})"
    if host is not None and host != socket.gethostname():
        return (
            f"index {folder} is being written by an absvl process on host {host} (pid {pid}{when}); "
            f"wait for it to finish ({release})"
        )
    state = _process_state(pid)
    if state is None:  # the recorded writer is gone but a process it started still has the lock open
        return (
            f"index {folder} is locked by a process that writer pid {pid} (now exited) started, e.g. an image-"
            f"loading worker, which still holds {path}; it is released when that process exits "
            f"(`fuser -v {path}` names it)"
        )
    if state == "stopped":
        return (
            f"index {folder} is being written by absvl process {pid} on this host{when}, which is stopped "
            f"(SIGSTOP / Ctrl-Z): resume it (`kill -CONT {pid}`, or `fg` in its shell) and let it finish, "
            f"or end it; {release}"
        )
    return f"index {folder} is being written by absvl process {pid}, running on this host{when}; wait for it to finish ({release})"


# --------------------------------------------------------------------------- the lock
def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not deleted or replaced since)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


class HeldLock:
    """The write lock as held by this process (``flock`` on an open ``INDEX.lock``)."""

    def __init__(self, folder: Path, path: Path, fd: int) -> None:
        self.folder, self.path, self.fd = folder, path, fd

    def check(self) -> None:
        """Raise :class:`IndexLockedError` when the lock file was deleted or replaced while held:
        another writer may have locked the new file and changed the index, so this one must not publish."""
        if not _same_file(self.fd, self.path):
            raise IndexLockedError(
                f"the lock {self.path} of index {self.folder} was deleted or replaced while this process "
                f"(pid {os.getpid()}) held it, so another writer may have changed the index meanwhile: this "
                "write was stopped and nothing was published; run it again (a lock file must never be "
                "deleted by hand: a dead writer's lock is taken over automatically)"
            )


class _NoLock:
    """What a helper process of a group holds: process 0 holds the lock for all."""

    def check(self) -> None:
        return None


@contextlib.contextmanager
def index_lock(folder: str | Path, wait: float = 0.0) -> Iterator[HeldLock]:
    """Hold the exclusive write lock of an index: ``flock`` on ``INDEX.lock`` beside the folder.

    A lock whose holder died is free (the OS released it) and is simply taken: the ``flock`` is the
    atomic takeover, and the holder record in the file is rewritten. If the file was deleted or
    replaced between opening and locking it, the lock is taken again on the file now at the path.
    Raises :class:`IndexLockedError` (naming the living holder: pid, host, since when, stopped or
    running) when another process still holds it after ``wait`` seconds. The file itself stays
    (deleting it would race with a process about to lock it).
    """
    folder = Path(os.path.abspath(folder))
    path = lock_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace")
            os.close(fd)
            if time.monotonic() >= deadline:
                raise IndexLockedError(_held_message(folder, path, record)) from None
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file no longer at the path: lock the one there now
    try:
        previous = _parse_holder(os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace"))[0]
        if previous is not None and previous != os.getpid():
            logger.info("taking over the write lock %s from pid %d (exited)", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record().encode(), 0)
        yield HeldLock(folder, path, fd)
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
def writing(folder: Path) -> Iterator[HeldLock | _NoLock]:
    """The write lock for a build/add/rebuild, with any interrupted swap undone first; yields the held
    lock, whose :meth:`HeldLock.check` the writer calls before it publishes.

    In a process group process 0 takes the lock and tells the others whether it got it, so all
    processes fail alike instead of the helpers waiting at a barrier.
    """
    rank, world = process_group()
    with contextlib.ExitStack() as stack:
        error: str | None = None
        held: HeldLock | _NoLock = _NoLock()
        if rank == 0:
            try:
                held = stack.enter_context(index_lock(folder))
                recover_swap(folder)
            except IndexLockedError as err:
                error = str(err)
        if world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise IndexLockedError(error)
        yield held
