"""Every environment variable krasis reads, in one place."""

import os
from pathlib import Path


def krasis_home() -> Path:
    """Where krasis keeps generated files (the embedded default model, caches)."""
    override = os.environ.get("KRASIS_HOME")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "krasis"


def quant_cache_root() -> Path:
    """Where quantized weight caches are built: $KRASIS_CACHE_DIR, else <krasis home>/quant."""
    override = os.environ.get("KRASIS_CACHE_DIR")
    return Path(override).expanduser() if override else krasis_home() / "quant"


def profile_dir() -> Path | None:
    """$KRASIS_PROFILE_DIR: each worker process writes a cProfile of its run there (<title>-<pid>.prof) on exit."""
    override = os.environ.get("KRASIS_PROFILE_DIR")
    return Path(override).expanduser() if override else None


def use_expandable_cuda_segments() -> None:
    """Ask torch's CUDA allocator for expandable segments (unless PYTORCH_CUDA_ALLOC_CONF says otherwise): prefill
    allocates blocks of many sizes chunk after chunk, and fixed segments fragmented until reserved memory
    passed the VRAM budget that allocated memory kept. Call before the first CUDA allocation."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
