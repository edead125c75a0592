import pytest
import torch

import ltfast  # noqa: F401  (registers torch.ops.ltfast)

CUDA = torch.cuda.is_available()


def device_params():
    """'cpu', plus 'cuda' (marked `cuda`) wherever a GPU is present."""
    params = [pytest.param("cpu", id="cpu")]
    params.append(pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]))
    return params


def pytest_collection_modifyitems(config, items):
    # In CI (CI=true) the compiled extension is required: a missing build is a failure, not a
    # silent fallback to the reference.
    import os
    if os.environ.get("CI") == "true" and not ltfast._extension.AVAILABLE:
        raise pytest.UsageError(f"ltfast._C is not available in CI: {ltfast._extension.LOAD_ERROR}")
