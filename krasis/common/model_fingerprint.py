"""Whether two hosts hold the same model: a digest of its config and its checkpoint files' names and sizes.

A decode pool on another host loads the weights from its own copy of the model directory; the gateway refuses
a pool whose fingerprint differs from its own. Hashing the weights themselves would take minutes per start, so
two fine-tunes of one architecture with identical file sizes are not told apart.
"""

import hashlib
import json
from pathlib import Path

from krasis.common.model_config import read_hf_config


def model_fingerprint(model_dir: str | Path) -> str:
    """`sha256:<hex>` of config.json (canonical JSON) and each *.safetensors file's name and size."""
    directory = Path(model_dir)
    files = sorted((p.name, p.stat().st_size) for p in directory.glob("*.safetensors"))
    identity = {"config": read_hf_config(directory), "files": files}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"sha256:{digest}"
