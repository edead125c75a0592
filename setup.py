"""Build of ltfast._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

LTFAST_CUDA=auto (default) builds the CUDA kernels when torch is a CUDA build and nvcc is found;
LTFAST_CUDA=1 requires them (the build fails loudly otherwise); LTFAST_CUDA=0 skips them.
TORCH_CUDA_ARCH_LIST is honoured; the default covers sm_80 (A100) and sm_90 (H100/H200).

The recipes in configs/ ship inside the package as ltfast/configs (copied at build time by
build_py below; the repository folder stays where it is), so `--config fmnist_lt/ce` resolves
from any directory after `pip install .`.

torch is not a build requirement on purpose: the extension must be compiled against the very torch
that will import it (its C++ ABI changes between releases). `pip install --no-build-isolation .`
builds against the current interpreter's torch; a plain `pip install .` (isolated build environment
without torch) finds the torch of the interpreter pip runs for and builds against that one.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _log(message):
    print(f"[ltfast setup] {message}", file=sys.stderr, flush=True)


def _real_cuda_home():
    """The toolkit folder. The nvcc on PATH may be a wrapper script, whose folder torch would take
    for CUDA_HOME; nvcc --dryrun prints the real TOP folder of the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    top = os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
                    if os.path.exists(os.path.join(top, "bin", "nvcc")):
                        return top
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


_mode = os.environ.get("LTFAST_CUDA", "auto").strip().lower()
if _mode not in ("auto", "0", "1"):
    raise SystemExit(f"LTFAST_CUDA must be auto, 0 or 1, got {_mode!r}")
_cuda_home = _real_cuda_home() if _mode != "0" else None
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home

def _torch_of_target_interpreter():
    """Makes `import torch` work inside pip's isolated build environment: pip hides the target
    interpreter's site-packages through PYTHONPATH/PYTHONNOUSERSITE; the same interpreter run
    without them shows where its torch lives, and that folder goes at the END of sys.path (the build
    environment's setuptools and ninja still win)."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname("
                              "torch.__file__)))"], capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.SubprocessError):
        out = None
    site = out.stdout.strip().splitlines()[-1] if out is not None and out.returncode == 0 and out.stdout.strip() else None
    if not site:
        raise SystemExit("ltfast: building the extension needs torch, which is not installed for "
                         f"{sys.executable}. Install torch first (e.g. pip install torch==2.14.1), then "
                         "pip install . (or pip install --no-build-isolation .)")
    _log(f"isolated build: compiling against the target interpreter's torch in {site}")
    sys.path.append(site)


_torch_of_target_interpreter()
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


# The range CI builds and tests (pyproject.toml; scripts/test_torch_versions.sh): outside it the
# build is tried anyway, with a warning, since the C++ touches a few torch internals
# (csrc/common/torch_compat.h) that may have moved.
SUPPORTED_TORCH = ((2, 11), (2, 15))


def _check_torch_version():
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    (low, high) = SUPPORTED_TORCH
    if not low <= version <= high:
        _log(f"WARNING: torch {torch.__version__} is outside the supported range "
             f"{low[0]}.{low[1]} - {high[0]}.{high[1]}: the build may fail or misbehave")
    else:
        _log(f"torch {torch.__version__} (supported range {low[0]}.{low[1]} - {high[0]}.{high[1]})")


def _want_cuda():
    if _mode == "0":
        return False
    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if not _cuda_home:
        problems.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        if _mode == "1":
            raise SystemExit("LTFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        _log("building without CUDA kernels: " + "; ".join(problems))
        return False
    return True


def _extension():
    _check_torch_version()
    with_cuda = _want_cuda()
    # csrc/simt/ is the test-only SIMT emulator build (tests/simt_support.py), never part of _C.
    cpp_sources = sorted(p for p in glob.glob("csrc/**/*.cpp", recursive=True) if not p.startswith("csrc/simt/"))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch's CUDA headers include cusparse.h and friends, which pip's CUDA wheels ship here.
    for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
        nvidia_include = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(nvidia_include):
            include_dirs.append(nvidia_include)
    # -fopenmp: at::parallel_for is header code that only runs in parallel when the extension
    # itself is compiled with OpenMP (without it, 2 threads were slower than 1 here: fwd+bwd at
    # [4096, 1000] 6.8 ms vs 3.6 ms with it, on 2 cores).
    cxx_flags = ["-O3", "-Wno-unknown-pragmas", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec's AVX2 Vectorized<float> is ~8x the scalar fallback that an extension compiled
        # without these flags would get. ltfast/_extension.py refuses to load _C on a CPU without
        # AVX2+FMA+F16C (and falls back to ltfast.reference) instead of crashing with SIGILL.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        _log(f"building CUDA kernels with {os.path.join(_cuda_home, 'bin', 'nvcc')} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: {', '.join(cuda_sources)}")
        return CUDAExtension(
            "ltfast._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("LTFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    return CppExtension("ltfast._C", cpp_sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags})


class build_py(_build_py):
    """Copies configs/**/*.yaml into the built package as ltfast/configs/ (package data without
    moving the repository folder; an editable install reads configs/ in place instead)."""

    def _config_files(self):
        out = []
        for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
            for name in sorted(files):
                if name.endswith((".yaml", ".yml")):
                    source = os.path.join(folder, name)
                    out.append((source, os.path.join(self.build_lib, "ltfast", "configs",
                                                      os.path.relpath(source, os.path.join(ROOT, "configs")))))
        return out

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for source, target in self._config_files():
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [target for _, target in self._config_files()]


setup(
    packages=find_packages(include=["ltfast", "ltfast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": build_py},
)
