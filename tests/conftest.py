import os

import pytest
import torch

import ltfast  # noqa: F401  (registers torch.ops.ltfast)

CUDA = torch.cuda.is_available()
IN_CI = os.environ.get("CI") == "true"


class SimtDevice(str):
    """The `simt` test device: CPU tensors ("cpu" wherever a device string is needed) whose ltfast
    ops run the CUDA kernels in the SIMT emulator (tests/simt_support.py)."""

    simt = True

    def __new__(cls):
        return super().__new__(cls, "cpu")


def is_simt(device) -> bool:
    return getattr(device, "simt", False)


class RecordOps:
    """Context manager recording the aten/ltfast ops dispatched inside it (`.names`)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Recorder(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.names = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.names.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        return _Recorder()


def device_params():
    """'cpu'; 'cuda' (marked `cuda`) wherever a GPU is present; and 'simt' (marked `simt`): the
    CUDA kernels executed by the SIMT emulator on CPU tensors, everywhere."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
        pytest.param(SimtDevice(), id="simt", marks=[pytest.mark.simt]),
    ]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device")
    config.addinivalue_line("markers", "simt: runs the CUDA kernels in the SIMT emulator on the CPU")
    config.addinivalue_line("markers", "simt_no_kernel: a simt test that may run no emulated kernel (errors raised first)")


def pytest_collection_modifyitems(config, items):
    # In CI (CI=true) the compiled extension is required: a missing build is a failure, not a
    # silent fallback to the reference.
    if IN_CI and not ltfast._extension.AVAILABLE:
        raise pytest.UsageError(f"ltfast._C is not available in CI: {ltfast._extension.LOAD_ERROR}")


@pytest.fixture(autouse=True)
def _emulate_cuda_kernels_for_simt(request):
    """For tests on the `simt` device: the ltfast ops' CPU kernels are rerouted to the emulated CUDA
    kernels for the test's duration, and the test must have run at least one of them."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec else None
    if not is_simt(device):
        yield
        return
    import simt_support
    try:
        simt_support.load()
    except Exception as error:  # a missing compiler or a broken build: a failure, never a skip
        pytest.fail(f"simt: {error}", pytrace=False)
    with simt_support.emulate_cuda_kernels() as calls:
        yield
    if request.node.get_closest_marker("simt_no_kernel") is None:
        assert calls[0] > 0, "this simt test ran no emulated CUDA kernel"
