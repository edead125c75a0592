"""Checks that ltfast/_C's code outside the AVX2/AVX512 kernel builds uses no AVX instruction.

    python scripts/check_cpu_isa.py [path/to/_C.so]

The extension must load and run its DEFAULT kernels on any x86-64 CPU (csrc/common/cpu_dispatch.h).
Only the objects of the AVX2 and AVX512 builds are compiled with -m flags, so VEX/EVEX code
(v-prefixed mnemonics, ymm/zmm/k registers) may only sit in
- functions of those builds' namespaces (a name with AVX2/AVX512 in it: ltfast::AVX512::...,
  at::vec::AVX2::..., templates and OpenMP regions instantiated on them), or
- local functions (static, `.constprop`/`.cold` clones): each is called from its own object only,
  and an object of the generic or DEFAULT build has no AVX instruction to begin with.
An offender is a global or weak function outside those namespaces (an inline function of a shared
header whose AVX-512 copy the linker kept, which DEFAULT code would then call) or a static
initialiser (runs at load time). Either would crash with SIGILL on an older CPU. Prints the
offenders; exit status 1 if any.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

_AVX = re.compile(r"^\s*[0-9a-f]+:\s+(v[a-z0-9]+)\b|%[yz]mm\d|%k[0-7]\b")
_FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")
# Demangled (AVX512::) and mangled (6AVX512, in names c++filt leaves alone such as ._omp_fn clones).
_CAPABILITY = re.compile(r"AVX2::|AVX512::|4AVX2|6AVX512")


def _global_addresses(path: str) -> set[int]:
    """Addresses of the global and weak function symbols (nm: T, W, i, u)."""
    out = subprocess.run(["nm", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] in ("T", "W", "i", "u"):
            found.add(int(parts[0], 16))
    return found


def offenders(path: str) -> dict[str, str]:
    """{function name: its first AVX instruction} for the global/weak functions outside the AVX
    builds and the static initialisers that hold AVX code."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    global_addresses = _global_addresses(path)
    found: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        m = _FUNCTION.match(line)
        if m:
            address, name = int(m.group(1), 16), m.group(2)
            initialiser = name.startswith("_GLOBAL__sub_I")
            checked = initialiser or (address in global_addresses and not _CAPABILITY.search(name))
            continue
        if name is None or not checked or name in found:
            continue
        if _AVX.search(line):
            found[name] = line.strip()
    return found


def main(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = argv[1:] or glob.glob(os.path.join(root, "ltfast", "_C*.so"))
    if not paths:
        print("no ltfast/_C*.so found: build the extension first")
        return 2
    bad = offenders(paths[0])
    for name, instruction in sorted(bad.items()):
        print(f"{name}\n    {instruction}")
    print(f"{paths[0]}: {len(bad)} function(s) use AVX instructions where they must not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
