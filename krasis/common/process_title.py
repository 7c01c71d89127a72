"""Process titles of the workers.

What `ps` shows for a worker spawned with title "cpu-decode-1":
- `ps -e`, `top`, `pgrep cpu-dec`, /proc/<pid>/comm: "krasis::cpu-dec" (the kernel keeps 15 bytes of comm);
- `ps -ef`, `ps aux`, `pgrep -f`, /proc/<pid>/cmdline: the full "krasis::cpu-decode-1" (via setproctitle when
  installed, else by rewriting the process's argv area in place).
"""

import ctypes
import sys

_PR_SET_NAME = 15
_COMM_BYTES = 15


def prctl(option: int, arg) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def set_process_title(title: str) -> None:
    """Name this process `title` for comm (15 bytes, via prctl) and for the full command line."""
    prctl(_PR_SET_NAME, ctypes.c_char_p(title.encode()[:_COMM_BYTES]))
    try:
        import setproctitle  # optional: it also rewrites argv, moving environ to make room for long titles
    except ImportError:
        _rewrite_argv_area(title.encode())
    else:
        setproctitle.setproctitle(title)


def _rewrite_argv_area(title: bytes) -> None:
    """Overwrite the kernel's argv area (what /proc/<pid>/cmdline reads) with `title`, cut to fit."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # stat fields 48 and 49
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, IndexError, ValueError):
        return
    size = arg_end - arg_start
    # Only write where we can prove the area is the argv we expect; otherwise leave the title to comm.
    if size <= 1 or ctypes.string_at(arg_start, size) != cmdline:
        return
    text = title[: size - 1]
    ctypes.memmove(arg_start, text + b"\0" * (size - len(text)), size)
