"""Building the C++ CPU extensions on first use (the quant kernels, the decode-step kernels): -march=native into
torch's extensions cache, each build named after the CPU model (a -march=native binary must not be loaded on another
CPU) and its source; a build that fails warns in one line and leaves its callers on their torch path."""

import hashlib
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_tag() -> str:
    """A short hash of the CPU model, for build names."""
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return hashlib.sha1(model.encode()).hexdigest()[:8]


def load_extension(name: str, source: Path, flags: list[str]):
    """Compile `source` (or reuse its cached build) as the op library `name` (KRASIS_OPS_NS in the source) with
    OpenMP and these compiler flags; returns its torch.ops namespace."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name, sources=[str(source)], extra_cflags=[*flags, "-fopenmp", f"-DKRASIS_OPS_NS={name}"],
        extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
    )  # fmt: skip
    return getattr(torch.ops, name)


def build_or_warn(build: Callable[[], object], what: str, fallback: str):
    """build(), or None after a one-line warning naming the compiler's first error when it fails."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any build failure means: the torch path
        reason = first_error_line(str(exc)) or type(exc).__name__
        warnings.warn(f"krasis: {what} unavailable ({reason}); using {fallback}", stacklevel=3)
        return None


def first_error_line(text: str) -> str:
    """The compiler's first `error:` line when there is one (the message starts with the whole command)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[0][:200]
