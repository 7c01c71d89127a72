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
