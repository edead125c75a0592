"""The CPU kernels on every instruction set this machine runs (csrc/common/cpu_dispatch.h).

ltfast._C holds each CPU kernel built three times (DEFAULT, AVX2, AVX512 on x86-64) and runs the one
torch picks (``at::native::get_cpu_capability()``). ATEN_CPU_CAPABILITY is read once per process, so each
capability runs in its own subprocess: it computes every op's forward and backward on fixed inputs
and saves them; the test compares each forced capability with the machine's native one.

What is expected to match how (per op, float32 unless said):
- exactly (bit-identical): which entries are exactly zero in the gradient (SEQL's drop decisions,
  a pure function of the seed's hash; EQL's suppressed tail negatives; ignored rows) and
  ltfast.cpu_capability() reporting the forced value;
- within tolerance: every loss and gradient value. The builds differ in the exp they use (at::vec's
  exp_u20 polynomial, <= 2.4e-6 relative, on AVX2/AVX512, std::exp on DEFAULT) and in the order of
  their sums (8 or 16 lanes), so float32 values agree to ~1e-6 relative, not to the bit; float64
  (exact std::exp everywhere) to ~1e-14.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NATIVE = torch.backends.cpu.get_cpu_capability()
# The capabilities this CPU can run, in ATEN_CPU_CAPABILITY's spelling. AVX512_VNNI / AMX CPUs run
# the AVX512 kernels (ATen's CPUCapability has no other x86 level).
_SUPPORTED = ["default"]
if _NATIVE in ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX"):
    _SUPPORTED.append("avx2")
if _NATIVE in ("AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX"):
    _SUPPORTED.append("avx512")

# (rtol, atol relative to the tensor's largest magnitude) per dtype.
_TOLERANCE = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-12, 1e-14), torch.bfloat16: (1.6e-2, 8e-3)}


def _inputs() -> dict:
    """The inputs of every case, made once by the test process: torch's own randn, softmax and log
    are ATen kernels whose results differ in the last bits between capabilities, so each worker
    loading them from a file is what makes the comparison one of ltfast's kernels alone.
    C = 1003 leaves a vector tail on both widths (1003 = 62 * 16 + 11); C = 4500 spans three
    2048-class tiles."""
    from ltfast import priors

    out = {}
    for N, C in [(37, 1003), (9, 4500)]:
        gen = torch.Generator().manual_seed(N * C)
        counts = torch.logspace(3.1, 0.7, C).round()
        target = torch.randint(0, C, (N,), generator=gen)
        target[3] = -100  # an ignored row
        out[f"{N}x{C}"] = {
            "log_prior": priors.log_prior(counts), "margin": 30 * priors.ldam_margins(counts),
            "weight": priors.effective_number_weights(counts), "tail": priors.tail_classes(counts),
            "target": target, "target_b": torch.randint(0, C, (N,), generator=gen),
            "soft": torch.softmax(torch.randn(N, C, generator=gen), dim=1),
            "x": 2 * torch.randn(N, C, generator=gen), "x3": 2 * torch.randn(N, 3, C, generator=gen),
            "adjustments": priors.sade_adjustments(counts, 2.0, dtype=torch.float32),
            "temperature": priors.ride_diversity_temperature(counts, 0.02, dtype=torch.float32),
        }
    return out


def _cases(inputs: dict):
    """(name, logits, fn(logits) -> loss) for every op on `inputs` (from _inputs)."""
    import ltfast

    def shape_cases(shape, t):  # a function per shape: the lambdas bind this shape's tensors
        target, full = t["target"], t["target"].clamp(min=0)  # LADE / experts: no ignored rows
        seed = torch.tensor([12345, 678], dtype=torch.int64)
        x, x3 = t["x"], t["x3"]
        return [
            (f"balanced_softmax-{shape}", x, lambda z: ltfast.balanced_softmax_loss(z, target, t["log_prior"])),
            (f"ldam_drw_smoothing-{shape}", x, lambda z: ltfast.adjusted_cross_entropy(
                z, target, target_margin=t["margin"], weight=t["weight"], label_smoothing=0.1)),
            (f"focal-{shape}", x, lambda z: ltfast.adjusted_cross_entropy(z, target, gamma=1.5)),
            (f"seql-{shape}", x, lambda z: ltfast.softmax_equalization_loss(z, target, t["tail"], 0.9, seed=seed)),
            (f"eql-{shape}", x, lambda z: ltfast.equalization_loss(z, target, t["tail"])),
            (f"lade-{shape}", x, lambda z: ltfast.lade_loss(z, full, t["log_prior"])),
            (f"mixup-{shape}", x, lambda z: ltfast.mixed_cross_entropy(z, target, t["target_b"], 0.3)),
            (f"probability-{shape}", x, lambda z: ltfast.probability_cross_entropy(
                z, t["soft"], adjustment=t["log_prior"])),
            (f"sade-{shape}", x3, lambda z: ltfast.diverse_expert_loss(z, full, t["adjustments"])),
            (f"ride-{shape}", x3, lambda z: ltfast.ride_loss(z, full, t["margin"], t["weight"], t["temperature"])),
            # x as the similarity [B = N, M = C] and its first 50 columns as sup_logits [N, 50]; 7 labels,
            # one anchor ignored.
            (f"paco-{shape}", x, lambda z: ltfast.paco_loss(
                z, target.remainder(7).masked_fill(target < 0, -100), torch.cat(
                    [target.remainder(7), torch.arange(z.shape[1] - z.shape[0]).remainder(7)]), z[:, :50],
                temperature=0.5, alpha=1.0, gamma=0.5)),
        ]

    cases = [case for shape, t in inputs.items() for case in shape_cases(shape, t)]
    out = []
    for name, x, fn in cases:
        dtypes = [torch.float32]
        if name.endswith("37x1003") and name.split("-")[0] in ("balanced_softmax", "lade", "seql"):
            dtypes += [torch.float64, torch.bfloat16]
        for dtype in dtypes:
            out.append((f"{name}-{str(dtype).split('.')[1]}", x.to(dtype), fn))
    return out


def _worker(inputs_path: str, path: str) -> None:
    import ltfast

    torch.set_num_threads(2)
    results = {"capability": ltfast.cpu_capability(), "torch": torch.backends.cpu.get_cpu_capability()}
    for name, x, fn in _cases(torch.load(inputs_path, weights_only=True)):
        z = x.clone().requires_grad_(True)
        loss = fn(z)
        loss.backward()
        results[name] = (loss.detach(), z.grad)
    torch.save(results, path)


def _run(capability: str | None, tmp_path, inputs_path: str) -> dict:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    path = str(tmp_path / f"{capability or 'native'}.pt")
    subprocess.run([sys.executable, os.path.abspath(__file__), inputs_path, path], env=env, check=True, cwd=ROOT, timeout=120)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import ltfast

    if not ltfast._extension.AVAILABLE:
        pytest.skip(f"ltfast._C unavailable: {ltfast._extension.LOAD_ERROR}")
    tmp = tmp_path_factory.mktemp("cpu_capability")
    inputs_path = str(tmp / "inputs.pt")
    torch.save(_inputs(), inputs_path)
    return {cap: _run(cap, tmp, inputs_path) for cap in [None] + _SUPPORTED}


def test_native_path_is_torchs():
    import ltfast

    if not ltfast._extension.AVAILABLE:
        pytest.skip(f"ltfast._C unavailable: {ltfast._extension.LOAD_ERROR}")
    expected = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}[_SUPPORTED[-1]]
    assert ltfast.cpu_capability() == expected


@pytest.mark.parametrize("capability", _SUPPORTED)
def test_forced_capability_is_reported(runs, capability):
    assert runs[capability]["capability"] == capability.upper()


@pytest.mark.parametrize("capability", [c for c in _SUPPORTED if c != _SUPPORTED[-1]] or ["default"])
def test_capability_matches_native(runs, capability):
    native, forced = runs[None], runs[capability]
    assert native["capability"] != forced["capability"] or len(_SUPPORTED) == 1
    names = [k for k in native if k not in ("capability", "torch")]
    assert len(names) >= 20
    for name in names:
        (loss_n, grad_n), (loss_f, grad_f) = native[name], forced[name]
        rtol, atol = _TOLERANCE[grad_n.dtype]
        scale = max(grad_n.abs().max().item(), 1e-30)
        # Exactly-zero entries (ignored rows, SEQL's dropped and EQL's suppressed entries) are the
        # same decision on every path.
        assert torch.equal(grad_n == 0, grad_f == 0), f"{name}: zero pattern differs on {capability}"
        torch.testing.assert_close(grad_f, grad_n, rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{name} gradient, {capability} vs native: {m}")
        torch.testing.assert_close(loss_f, loss_n, rtol=rtol, atol=atol * max(loss_n.abs().max().item(), 1e-30),
                                   msg=lambda m: f"{name} loss, {capability} vs native: {m}")



def test_no_avx_code_outside_the_avx_builds():
    """Loading _C and running its DEFAULT kernels must not execute an AVX instruction
    (scripts/check_cpu_isa.py): only functions of the AVX2/AVX512 builds may hold any."""
    import glob
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    paths = glob.glob(os.path.join(ROOT, "ltfast", "_C*.so"))
    if not paths:
        pytest.skip("ltfast/_C is not built in this checkout")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import check_cpu_isa
    finally:
        sys.path.pop(0)
    assert check_cpu_isa.offenders(paths[0]) == {}


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
