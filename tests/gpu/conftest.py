"""GPU tests run only where CUDA is available (the lent H100 machine); elsewhere they are skipped."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from tests.models.conftest import checkpoint_dirs, model_dir, ours, reference, variant  # noqa: E402,F401
