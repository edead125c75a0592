"""The ``simt`` test device: ltfast's CUDA kernels run on CPU tensors by the SIMT emulator.

``build()`` compiles ``csrc/simt/`` (the emulator) together with the CUDA backends' own ``.cu``
files, compiled for the host with ``LTFAST_SIMT``, into ``build/simt/ltfast_simt.so``: a test-only
library that registers CPU kernels for mirror ops ``torch.ops.ltfast_simt.<op>``, one per ltfast op
with a CUDA kernel, with the same schema. It is never installed with the package.

``emulate_cuda_kernels()`` then reroutes, while it is active, the CPU kernel of each such
``torch.ops.ltfast`` op to its ``ltfast_simt`` mirror, so that everything above the kernels
(autograd, ``ltfast.nn``, ``torch.compile``, ``opcheck``) runs unchanged on top of the emulated
CUDA kernels. Each emulated op runs under three schedules and checks that they agree bit for bit.

    python tests/simt_support.py --build     # build (scripts/setup.sh does this)
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIRECTORY = os.path.join(ROOT, "build", "simt")
LIBRARY_NAME = "ltfast_simt"
_state: dict = {"loaded": False, "ops": (), "error": None}
_calls = [0]
# Emulated CUDA_KERNEL_ASSERTs raised so far: on a real GPU each would be a device-side assert that
# leaves the process's CUDA context unusable (tests/conftest.py requires such tests to be marked).
_kernel_asserts = [0]
KERNEL_ASSERT_TAG = "CUDA_KERNEL_ASSERT"


def sources() -> list[str]:
    csrc = os.path.join(ROOT, "csrc")
    # The emulator, one host compile of each CUDA backend (csrc/simt/<family>_simt.cpp includes
    # csrc/ops/<family>/<family>_cuda.cu), and the argument checks those backends call.
    return sorted(glob.glob(os.path.join(csrc, "simt", "*.cpp")) +
                  glob.glob(os.path.join(csrc, "ops", "*", "*_args.cpp")))


def _mirrored_op_names() -> list[str]:
    """The ltfast ops that have a CPU kernel of their own (not composites)."""
    import ltfast  # noqa: F401  (loads ltfast._C)
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ltfast::"))
    return [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"ltfast::{n}", "CPU")]


def _define_mirror_schemas(names) -> None:
    lib = torch.library.Library(LIBRARY_NAME, "FRAGMENT")
    _state["schema_library"] = lib  # registrations live as long as this object
    for name in names:
        schema = str(getattr(torch.ops.ltfast, name).default._schema)
        lib.define(schema.split("::", 1)[1])


def build(verbose: bool = False) -> str:
    """Compiles (if needed) and returns the path of the SIMT library, without loading it."""
    from torch.utils.cpp_extension import _jit_compile  # noqa: F401  (fail early on an old torch)
    from torch.utils import cpp_extension

    os.makedirs(BUILD_DIRECTORY, exist_ok=True)
    return cpp_extension.load(
        name=LIBRARY_NAME,
        sources=sources(),
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        # -O2: the emulated kernels run per fiber; -fvisibility=hidden keeps the emulator's copies of
        # ltfast's inline functions from interposing with ltfast._C's.
        # -std=c++20 (after torch's own -std, so it wins): the emulator reports
        # kernel asserts with std::source_location; torch <= 2.13 compiles extensions as C++17.
        extra_cflags=["-O2", "-std=c++20", "-DLTFAST_SIMT=1", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                      "-Wno-unknown-pragmas"],
        build_directory=BUILD_DIRECTORY,
        is_python_module=False,
        is_standalone=False,
        verbose=verbose,
        keep_intermediates=True,
    ) or os.path.join(BUILD_DIRECTORY, f"{LIBRARY_NAME}.so")


def load() -> None:
    """Builds if needed, defines the mirror schemas and loads the library (once per process)."""
    if _state["loaded"]:
        return
    if _state["error"] is not None:
        raise RuntimeError(_state["error"])
    try:
        names = _mirrored_op_names()
        _define_mirror_schemas(names)
        build()  # cpp_extension.load also loads the library into the process
        emulated = [n for n in names
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY_NAME}::{n}", "CPU")]
    except Exception as error:  # remember, so that every simt test reports the same cause
        _state["error"] = f"the SIMT emulator library could not be built or loaded: {error}"
        raise
    _state["ops"] = tuple(emulated)
    _state["loaded"] = True


def emulated_ops() -> tuple:
    load()
    return _state["ops"]


def counters() -> dict:
    load()
    values = torch.ops.ltfast_simt.counters()
    return dict(zip(("launches", "blocks", "threads", "barriers", "collectives", "shared_arrays"), values))


def _redirect(name: str):
    target = getattr(torch.ops.ltfast_simt, name).default

    def kernel(*args, **kwargs):
        _calls[0] += 1
        try:
            return target(*args, **kwargs)
        except RuntimeError as error:
            if KERNEL_ASSERT_TAG in str(error):
                _kernel_asserts[0] += 1
            raise

    return kernel


@contextlib.contextmanager
def emulate_cuda_kernels():
    """While active, ltfast ops on CPU tensors run their CUDA kernels in the emulator. Yields a
    two-element list, filled when the block exits: the number of emulated op calls made inside the
    block, and how many of them ended in a CUDA_KERNEL_ASSERT (a device-side assert on a GPU)."""
    load()
    lib = torch.library.Library("ltfast", "IMPL")
    start, asserts_before = _calls[0], _kernel_asserts[0]
    made = [0, 0]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            for name in _state["ops"]:
                lib.impl(name, _redirect(name), "CPU")
        yield made
    finally:
        made[0] = _calls[0] - start
        made[1] = _kernel_asserts[0] - asserts_before
        lib._destroy()


if __name__ == "__main__":
    if "--build" in sys.argv:
        path = build(verbose="--verbose" in sys.argv)
        print(f"== SIMT emulator library: {path}")
    else:
        load()
        print("emulated ops:", ", ".join(emulated_ops()))
