"""Named POSIX shared-memory segments under /dev/shm: creating one (space checked up front), the owner's
duty to unlink it (at exit and on SIGTERM), and removing those whose owner died. The KV pool (shm.py) and
the expert-shard exchange (cpu_worker/shard_exchange.py) are both such segments.

Plain files, no multiprocessing.shared_memory: its resource_tracker unlinks (and warns about) segments that
attaching processes merely mapped, on Python < 3.13.
"""

import atexit
import errno
import mmap
import os
import re
import signal
import threading
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")  # a plain file name: no '/', no leading '.'
_OWNER_AND_TOKEN = re.compile(r"(\d+)-[0-9a-f]{8}")


class SharedMemoryFull(RuntimeError):
    """/dev/shm cannot hold the segment asked for."""


def check_space(size: int) -> None:
    """SharedMemoryFull unless /dev/shm has `size` bytes free."""
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    if size > free:
        raise SharedMemoryFull(_space_message(size, free))


def _space_message(size: int, free: int) -> str:
    return (
        f"the segment needs {size / 2**30:.2f} GiB of shared memory but {SHM_DIR} has {free / 2**30:.2f} GiB free; "
        "use fewer KV pages or enlarge it (`mount -o remount,size=...`, or `--shm-size` in Docker)"
    )


def create_segment(path: Path, size: int, reserve: bool) -> mmap.mmap:
    """Create and map a new segment; `reserve` claims its memory now, so a full /dev/shm fails here, not as SIGBUS."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if reserve:
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except OSError as exc:
        os.unlink(path)
        if exc.errno == errno.ENOSPC:
            stat = os.statvfs(SHM_DIR)
            raise SharedMemoryFull(_space_message(size, stat.f_bavail * stat.f_frsize)) from exc
        raise
    finally:
        os.close(fd)


# Segments this process owns, path -> owner pid, removed at exit and on SIGTERM.
_owned: dict[str, int] = {}
_previous_sigterm = None
_sigterm_hooked = False


def track_owned(path: Path) -> None:
    """This process owns `path`: unlink it at exit and on SIGTERM."""
    _owned[str(path)] = os.getpid()
    _hook_sigterm()


def unlink_segment(path: Path) -> None:
    """Remove a segment's name (processes that have it mapped keep using it); no longer owned."""
    _owned.pop(str(path), None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@atexit.register
def _remove_owned_segments() -> None:
    for path, pid in list(_owned.items()):
        if pid == os.getpid():
            unlink_segment(Path(path))


def _hook_sigterm() -> None:
    """Unlink owned segments on SIGTERM, then do what SIGTERM did before (default: die of it)."""
    global _previous_sigterm, _sigterm_hooked
    if _sigterm_hooked or threading.current_thread() is not threading.main_thread():
        return  # handlers can only be set from the main thread; atexit still covers normal exits
    _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_hooked = True


def _on_sigterm(signum, frame) -> None:
    _remove_owned_segments()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def cleanup_stale(prefix: str) -> list[str]:
    """Remove segments `<prefix>-<pid>-<token>` whose owner pid is gone; returns the names removed.

    Pids are judged in this pid namespace: run it where the owners ran (a container has its own /dev/shm).
    """
    if not SEGMENT_NAME.fullmatch(prefix):
        raise ValueError(f"bad shared-memory name prefix {prefix!r}")
    removed = []
    for path in sorted(SHM_DIR.glob(f"{prefix}-*")):
        match = _OWNER_AND_TOKEN.fullmatch(path.name[len(prefix) + 1 :])
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat.rsplit(b")", 1)[1].split()[:1] != [b"Z"]  # a zombie has exited; only its parent has not reaped it
