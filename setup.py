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


# The CPU kernels (csrc/ops/<family>/<family>_cpu.cpp) are compiled once per CPU capability, as ATen
# compiles aten/src/ATen/native/cpu/ (cmake/Codegen.cmake): the same source with CPU_CAPABILITY set and
# that capability's -m flags, its code in namespace ltfast::<CAPABILITY>; csrc/common/cpu_dispatch.h
# picks one at run time from at::native::get_cpu_capability() (ATEN_CPU_CAPABILITY=avx2 forces AVX2).
# at::vec's Vectorized<float> has 16 lanes under AVX512, 8 under AVX2, and is a scalar array under
# DEFAULT (any x86-64 CPU). Everything else (argument checks, autograd, schemas, Python entry points)
# is compiled once, without -m flags, so that loading _C runs no AVX instruction on any CPU.
#
# Per-file -m flags rather than `#pragma GCC target`: a pragma would have to precede every header the
# kernels include (libstdc++, c10, at::vec, whose code paths test CPU_CAPABILITY_AVX512 and the
# compiler's __AVX512F__), and GCC refuses to inline functions across target attributes; -m flags per
# translation unit is how ATen does it and gives the compiler the whole file at one target.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}
CPU_CAPABILITY_DIR = os.path.join("build", "cpu_capability")


def _cpu_capabilities():
    if platform.machine() in ("x86_64", "AMD64"):
        return ["DEFAULT", "AVX2", "AVX512"]
    return ["DEFAULT"]  # other architectures: at::vec's DEFAULT build (NEON on aarch64 comes with it)


def _capability_sources(kernel_sources):
    """One small generated .cpp per (kernel source, capability) that sets the capability macros and
    #includes the real source; setup.py's build_ext below gives each its -m flags. Rewritten only when
    their text changes, so ninja's incremental build still works."""
    out = []
    os.makedirs(os.path.join(ROOT, CPU_CAPABILITY_DIR), exist_ok=True)
    for capability in _cpu_capabilities():
        for source in kernel_sources:
            stem = os.path.splitext(os.path.basename(source))[0]
            wrapper = os.path.join(CPU_CAPABILITY_DIR, f"{stem}.{capability}.cpp")
            text = (f"// Generated by setup.py: {source} built for CPU_CAPABILITY={capability}.\n"
                    f"#define CPU_CAPABILITY {capability}\n"
                    f"#define CPU_CAPABILITY_{capability} 1\n"
                    f"#include \"{os.path.relpath(source, 'csrc')}\"\n")
            path = os.path.join(ROOT, wrapper)
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            out.append(wrapper)
    return out


def _source_capability(source):
    """The capability of a generated wrapper (None for a generic source)."""
    parts = os.path.basename(source).split(".")
    if os.path.dirname(os.path.normpath(source)) == os.path.normpath(CPU_CAPABILITY_DIR) and len(parts) == 3:
        return parts[1]
    return None


def _cuda_library_headers(nvidia_include):
    """torch's CUDA headers include cusparse.h, cublas_v2.h and friends, which a minimal toolkit
    lacks and pip's CUDA wheels ship in site-packages/nvidia/cu13/include. That folder also holds the
    wheels' own cuda_runtime_api.h, of the CUDA release torch was built with (13.2 for torch
    2.15.0+cu132), which nvcc 13.0 refuses ("CUDA compiler and CUDA toolkit headers are
    incompatible"). So only the headers the toolkit lacks are offered, as links in a folder of
    their own; the toolkit's runtime headers always win."""
    toolkit = set(os.listdir(os.path.join(_cuda_home, "include"))) if _cuda_home and \
        os.path.isdir(os.path.join(_cuda_home, "include")) else set()
    folder = os.path.join(ROOT, "build", "cuda_library_headers")
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # links from an earlier build against another torch or toolkit
        os.unlink(os.path.join(folder, name))
    for name in sorted(os.listdir(nvidia_include)):
        if name not in toolkit:
            os.symlink(os.path.join(nvidia_include, name), os.path.join(folder, name))
    return folder


def _extension():
    _check_torch_version()
    with_cuda = _want_cuda()
    # csrc/simt/ is the test-only SIMT emulator build (tests/simt_support.py), never part of _C.
    cpp_sources = sorted(p for p in glob.glob("csrc/**/*.cpp", recursive=True) if not p.startswith("csrc/simt/"))
    kernel_sources = sorted(glob.glob("csrc/ops/*/*_cpu.cpp"))
    # sampling_cpu.cpp has no vector code (counter-based permutations): built once, generically.
    kernel_sources = [p for p in kernel_sources if not p.endswith("sampling_cpu.cpp")]
    generic_sources = [p for p in cpp_sources if p not in kernel_sources]
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    nvidia_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    if os.path.isdir(nvidia_include):
        include_dirs.append(_cuda_library_headers(nvidia_include))
    # -fopenmp: at::parallel_for is header code that only runs in parallel when the extension
    # itself is compiled with OpenMP (without it, 2 threads were slower than 1 here: fwd+bwd at
    # [4096, 1000] 6.8 ms vs 3.6 ms with it, on 2 cores).
    cxx_flags = ["-O3", "-Wno-unknown-pragmas", "-fopenmp"]
    define_macros = []
    if _cpu_capabilities() != ["DEFAULT"]:
        define_macros.append(("LTFAST_CPU_DISPATCH_X86", "1"))  # csrc/common/cpu_dispatch.h
    # Link order matters: generic objects first, then DEFAULT, AVX2, AVX512 (build_ext keeps the
    # order). An inline function emitted by several objects (a c10 or libstdc++ template, the implicit
    # copy of an args struct) is kept from the first, so a copy compiled with -mavx2 or -mavx512f is
    # only kept when no object of a lower capability emitted it, i.e. when only code of that
    # capability or above calls it.
    capability_sources = _capability_sources(kernel_sources)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        _log(f"building CUDA kernels with {os.path.join(_cuda_home, 'bin', 'nvcc')} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: {', '.join(cuda_sources)}")
        return CUDAExtension(
            "ltfast._C",
            generic_sources + cuda_sources + capability_sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("LTFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    return CppExtension("ltfast._C", generic_sources + capability_sources, include_dirs=include_dirs,
                        define_macros=define_macros, extra_compile_args={"cxx": cxx_flags})


class build_ext(BuildExtension):
    """torch's BuildExtension (ninja), compiling the generated per-capability wrappers with their
    capability's -m flags: torch gives one set of flags to a whole extension, so the sources are
    compiled in groups (generic, DEFAULT, AVX2, AVX512), each group by its own ninja file in its own
    folder of build_temp, and linked in that order (see _extension)."""

    def build_extension(self, ext):
        ninja_compile = self.compiler.compile

        def compile_by_capability(sources, output_dir=None, extra_postargs=None, **kwargs):
            groups = {}
            for source in sources:
                groups.setdefault(_source_capability(source), []).append(source)
            objects = []
            for capability in [None] + _cpu_capabilities():
                if capability not in groups:
                    continue
                postargs = extra_postargs
                folder = output_dir
                if capability is not None:
                    flags = CPU_CAPABILITY_FLAGS[capability]
                    if isinstance(extra_postargs, dict):
                        postargs = dict(extra_postargs, cxx=list(extra_postargs.get("cxx", [])) + flags)
                    else:
                        postargs = list(extra_postargs or []) + flags
                    folder = os.path.join(output_dir or self.build_temp, capability.lower())
                objects += ninja_compile(groups[capability], output_dir=folder, extra_postargs=postargs,
                                         **kwargs)
            return objects

        self.compiler.compile = compile_by_capability
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = ninja_compile


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
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True), "build_py": build_py},
)
