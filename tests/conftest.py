import os
import subprocess
import sys

import pytest
import torch

import ltfast  # noqa: F401  (registers torch.ops.ltfast)

CUDA = torch.cuda.is_available()
IN_CI = os.environ.get("CI") == "true"
# Set in the child process that runs one `device_assert` test's cuda variant on its own.
ISOLATED_ENV = "LTFAST_TEST_ISOLATED"
ISOLATED = os.environ.get(ISOLATED_ENV) == "1"
# A device-side assert surfaces as this RuntimeError at the next synchronisation.
DEVICE_ASSERT_PATTERN = "device-side assert"


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
    config.addinivalue_line("markers", "no_simt_twin(reason): a cuda test that cannot have an emulated twin")
    config.addinivalue_line(
        "markers", "device_assert: the test makes a CUDA kernel assert (out-of-range targets, bad tables): its "
        "cuda variant runs in a child process, since a device-side assert leaves the CUDA context unusable")


def pytest_collection_modifyitems(config, items):
    # In CI (CI=true) the compiled extension is required: a missing build is a failure, not a
    # silent fallback to the reference.
    if IN_CI and not ltfast._extension.AVAILABLE:
        raise pytest.UsageError(f"ltfast._C is not available in CI: {ltfast._extension.LOAD_ERROR}")
    _check_cuda_tests_have_emulated_twins(items)


def _device_param(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("device") if callspec else None


def _check_cuda_tests_have_emulated_twins(items):
    """Collection-time check: every test with a `cuda` variant has a `simt` variant too (same
    function, same other parameters). The simt variant runs the same CUDA kernels in the emulator on
    every CI run, where an emulated CUDA_KERNEL_ASSERT in a test not marked `device_assert` fails it
    (fixture below): so no unmarked cuda test can assert on the device and poison the context of the
    tests after it. Tests whose cuda variant cannot have an emulated twin (nvJPEG decoding, DALI's
    GPU pipelines, the CUDA stream/graph checks) say so with `no_simt_twin`."""
    variants = {}
    for item in items:
        device = _device_param(item)
        if device is None:
            continue
        others = tuple(sorted((k, repr(v)) for k, v in item.callspec.params.items() if k != "device"))
        key = (item.path, item.originalname, others)
        variants.setdefault(key, set()).add("simt" if is_simt(device) else str(device))
    missing = []
    for item in items:
        if _device_param(item) != "cuda" or is_simt(_device_param(item)) or item.get_closest_marker("no_simt_twin"):
            continue
        others = tuple(sorted((k, repr(v)) for k, v in item.callspec.params.items() if k != "device"))
        if "simt" not in variants[(item.path, item.originalname, others)]:
            missing.append(item.nodeid)
    if missing:
        raise pytest.UsageError(
            f"{len(missing)} cuda test(s) have no simt twin, so nothing checks that they cannot make a device-side "
            "assert (give them a simt variant, or mark them no_simt_twin with the reason): " + ", ".join(missing[:10]))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """The cuda variant of a `device_assert` test runs alone in a child pytest: its device-side
    assert ends that process's CUDA context, not the context of every CUDA test after it."""
    if ISOLATED or _device_param(pyfuncitem) != "cuda" or pyfuncitem.get_closest_marker("device_assert") is None:
        return None
    env = dict(os.environ, **{ISOLATED_ENV: "1"})
    child = subprocess.run([sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-p", "no:cacheprovider",
                            "-p", "no:xdist"], cwd=str(pyfuncitem.config.rootpath), env=env,
                           capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        pytest.fail(f"in a child process (device_assert), exit {child.returncode}:\n{child.stdout[-3000:]}"
                    f"{child.stderr[-2000:]}", pytrace=False)
    return True


@pytest.fixture(autouse=True)
def _stop_if_cuda_context_poisoned(request):
    """After every cuda test: synchronise, and stop the whole run with one message if the CUDA context
    is dead (every later CUDA test in this process would fail with the same sticky error)."""
    yield
    if not CUDA or ISOLATED or _device_param(request.node) != "cuda":
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        pytest.exit(f"the CUDA context was poisoned by {request.node.nodeid} ({str(error).splitlines()[0]}); "
                    "stopping: every later CUDA test in this process would fail. A test that can make a "
                    "device-side assert must be marked device_assert.", returncode=3)


def expect_kernel_assert(device, cpu_error=IndexError, cpu_match=None, kernel_match=None):
    """The error an out-of-range input gives on each device: on the CPU an exception naming the row
    (`cpu_error`, `cpu_match`); in the emulator a RuntimeError naming the failed CUDA_KERNEL_ASSERT
    (`kernel_match`, a regex on the assert's condition); on a GPU a device-side assert, which
    surfaces at the next synchronisation (the test must be marked `device_assert`)."""
    if is_simt(device):
        return pytest.raises(RuntimeError, match="CUDA_KERNEL_ASSERT" + (f".*{kernel_match}" if kernel_match else ""))
    if str(device).startswith("cuda"):
        return _raises_device_assert()
    return pytest.raises(cpu_error, match=cpu_match)


class _raises_device_assert:
    def __enter__(self):
        self._raises = pytest.raises(RuntimeError, match=DEVICE_ASSERT_PATTERN)
        self._raises.__enter__()
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            try:
                torch.cuda.synchronize()
            except RuntimeError as error:
                return self._raises.__exit__(type(error), error, error.__traceback__)
        return self._raises.__exit__(kind, value, traceback)


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
    # The forward-time gradient is off here, so that the simt tests of every op keep running the backward
    # kernels through autograd. (On simt's CPU tensors autograd would scale that gradient on the host,
    # not with the GPU's _scale_forward_grad_; the forward-time gradient of the CUDA kernels has tests of
    # its own that turn it on: test_cross_entropy.py, test_gpu_forward_time_gradient_*.)
    import ltfast
    forward_gradient = ltfast.set_forward_gradient(False)
    try:
        with simt_support.emulate_cuda_kernels() as calls:
            yield
    finally:
        ltfast.set_forward_gradient(forward_gradient)
    if request.node.get_closest_marker("simt_no_kernel") is None:
        assert calls[0] > 0, "this simt test ran no emulated CUDA kernel"
    if calls[1] > 0 and request.node.get_closest_marker("device_assert") is None:
        pytest.fail(f"this test made {calls[1]} emulated CUDA_KERNEL_ASSERT(s): on a GPU each is a device-side "
                    "assert that kills the CUDA context of every test after it. Mark it @pytest.mark.device_assert "
                    "(its cuda variant then runs in a child process).", pytrace=False)


@pytest.fixture(scope="session")
def jpeg_lists(tmp_path_factory):
    """A tiny ImageNet-LT-shaped list-file dataset for the ResNeXt-50 recipe tests (causal / MiSLAS,
    ResLT, RSG): 3 RGB classes with 8 / 4 / 2 training images, 2 validation and 2 test images each, so
    one step of 8 images per epoch (a ResNeXt-50 step takes seconds on a busy 2-core CPU). Built once
    per session; returns (root, {split: list file})."""
    pytest.importorskip("nvidia.dali")
    from ltfast.data import write_jpeg_folder
    from ltfast.train import load_config
    from ltfast.train.data import load_datasets
    root = tmp_path_factory.mktemp("lt_jpegs")
    data = load_config(None, ["data.dataset=synthetic", "data.num_classes=3", "data.n_max=8", "data.ratio=4",
                              "data.image_size=32", "data.channels=3", "data.val_per_class=2",
                              "data.test_per_class=2"])["data"]
    sets = load_datasets(data)
    lists = {split: write_jpeg_folder(sets[split], str(root), split) for split in ("train", "val", "test")}
    return root, lists


@pytest.fixture(scope="session")
def rgb_jpegs(tmp_path_factory):
    """4 classes of 24x24 RGB JPEGs: train 3 per class (one batch of 12), val 1, test 2."""
    from ltfast.data import InMemoryDataset, write_jpeg_folder
    root = tmp_path_factory.mktemp("rgb")
    gen = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 3), ("val", 1), ("test", 2)):
        labels = torch.arange(4).repeat_interleave(per_class)
        images = (torch.rand(labels.numel(), 3, 24, 24, generator=gen) * 255).to(torch.uint8)
        write_jpeg_folder(InMemoryDataset(images, labels), str(root), split)
    return root
