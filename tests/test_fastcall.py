"""The direct entry points of ltfast._C (csrc/python_entry.cpp): every loss functional and module
takes them in eager mode with plain tensors, and takes torch.ops.ltfast.<op>.default under
torch.compile, under a TorchFunctionMode and with tensor subclasses; results are identical either
way, and argument errors keep their type and message."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import ltfast
import ltfast._dispatch
import ltfast.nn
import ltfast.ops

pytestmark = pytest.mark.skipif(not ltfast._extension.AVAILABLE, reason="needs the compiled extension")

N, C = 6, 5
COUNTS = [50, 20, 9, 3, 1]


class _Recorder:
    """Wraps ltfast._C's entry points: records each call and whether it returned a tensor (taken) or
    NotImplemented (declined)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def __getattr__(self, name):
        function = getattr(self.inner, name)

        def call(*args):
            out = function(*args)
            self.calls.append((name, out is not NotImplemented))
            return out

        return call


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder(ltfast._dispatch.fast)
    monkeypatch.setattr(ltfast._dispatch, "fast", rec)
    return rec


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, generator=g, dtype=dtype)
    target = torch.tensor([0, 1, 2, 3, 4, -100])
    prior = ltfast.priors.log_prior(COUNTS)
    tail = torch.tensor([False, False, True, True, True])
    seed = torch.tensor([3, 7], dtype=torch.int64)
    return logits, target, prior, tail, seed


def _functionals():
    _, target, prior, tail, seed = _inputs()
    weight = torch.rand(C, generator=torch.Generator().manual_seed(1)) + 0.5
    return {
        "balanced_softmax_loss": lambda x: ltfast.balanced_softmax_loss(x, target, prior),
        "balanced_softmax_loss none": lambda x: ltfast.balanced_softmax_loss(x, target, prior, "none", -100),
        "adjusted_cross_entropy": lambda x: ltfast.adjusted_cross_entropy(
            x, target, prior, 0.5 * prior.abs(), weight, gamma=0, label_smoothing=0.1, reduction="sum"),
        "adjusted_cross_entropy focal": lambda x: ltfast.adjusted_cross_entropy(x, target, weight=weight, gamma=2.0),
        "softmax_equalization_loss": lambda x: ltfast.softmax_equalization_loss(x, target, tail, 0.5, seed=seed),
        "equalization_loss": lambda x: ltfast.equalization_loss(x, target, tail),
        "lade_loss": lambda x: ltfast.lade_loss(x, target, prior),
        "lade_regularizer": lambda x: ltfast.lade_regularizer(x, target, prior, 0.2),
        "mixed_cross_entropy": lambda x: ltfast.mixed_cross_entropy(x, target, target.flip(0), 0.3, weight=weight),
        "balanced_softmax_loss mixed": lambda x: ltfast.balanced_softmax_loss(x, target, prior, target_b=target.flip(0),
                                                                             mix_weight=torch.tensor(0.3)),
    }


def _modules():
    return {
        "BalancedSoftmaxLoss": ltfast.nn.BalancedSoftmaxLoss(COUNTS),
        "BalancedSoftmaxLoss smoothing": ltfast.nn.BalancedSoftmaxLoss(COUNTS, label_smoothing=0.1),
        "LogitAdjustedLoss": ltfast.nn.LogitAdjustedLoss(COUNTS, tau=1.5),
        "WeightedCrossEntropyLoss": ltfast.nn.WeightedCrossEntropyLoss(COUNTS),
        "LDAMLoss": ltfast.nn.LDAMLoss(COUNTS, drw_epoch=0),
        "FocalLoss": ltfast.nn.FocalLoss(2.0),
        "EqualizationLoss": ltfast.nn.EqualizationLoss(COUNTS, count_threshold=10),
        "LADELoss": ltfast.nn.LADELoss(COUNTS),
        "CrossEntropyLoss": ltfast.nn.CrossEntropyLoss(label_smoothing=0.1),
    }


def _run(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.sum().backward()
    return loss.detach(), x.grad


class _PassThroughMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("name", list(_functionals()))
def test_functional_fast_path_eager_and_fallbacks(name, recorder):
    fn = _functionals()[name]
    logits = _inputs()[0]
    fast_loss, fast_grad = _run(fn, logits)
    assert recorder.calls and all(taken for _, taken in recorder.calls), recorder.calls

    # A TorchFunctionMode sees the op: the entry point declines and torch.ops runs it.
    recorder.calls.clear()
    with _PassThroughMode() as mode:
        mode_loss, mode_grad = _run(fn, logits)
    assert recorder.calls and not any(taken for _, taken in recorder.calls), recorder.calls
    assert any(getattr(f, "namespace", None) == "ltfast" for f in mode.seen)
    torch.testing.assert_close(mode_loss, fast_loss, rtol=0, atol=0)
    torch.testing.assert_close(mode_grad, fast_grad, rtol=0, atol=0)

    # A tensor subclass: declined too.
    recorder.calls.clear()
    sub_loss = fn(logits.as_subclass(_Sub))
    assert recorder.calls and not any(taken for _, taken in recorder.calls), recorder.calls
    torch.testing.assert_close(sub_loss.as_subclass(torch.Tensor), fast_loss, rtol=0, atol=0)

    # torch.compile never reaches the entry points.
    recorder.calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grad = _run(compiled, logits)
    assert recorder.calls == []
    torch.testing.assert_close(compiled_loss, fast_loss)
    torch.testing.assert_close(compiled_grad, fast_grad)


def _fast_then_declined(recorder, call, logits):
    """Runs `call` in eager mode (the fast path must be taken) and under a TorchFunctionMode (it must
    be declined); both give bit-identical loss and gradient, which are returned."""
    torch.manual_seed(0)
    fast_loss, fast_grad = _run(call, logits)
    assert recorder.calls and all(taken for _, taken in recorder.calls), recorder.calls
    recorder.calls.clear()
    torch.manual_seed(0)
    with _PassThroughMode():
        mode_loss, mode_grad = _run(call, logits)
    assert recorder.calls and not any(taken for _, taken in recorder.calls), recorder.calls
    torch.testing.assert_close(mode_loss, fast_loss, rtol=0, atol=0)
    torch.testing.assert_close(mode_grad, fast_grad, rtol=0, atol=0)
    return fast_loss, fast_grad


@pytest.mark.parametrize("name", list(_modules()))
def test_module_fast_path(name, recorder):
    module = _modules()[name]
    logits, target = _inputs()[:2]
    fast_loss, fast_grad = _fast_then_declined(recorder, lambda x: module(x, target), logits)

    # Under torch.compile the module takes the functionals (torch.ops), without recompiling.
    recorder.calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: module(x, target), fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grad = _run(compiled, logits)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run(compiled, logits + 1)
    assert recorder.calls == []
    torch.testing.assert_close(compiled_loss, fast_loss)
    torch.testing.assert_close(compiled_grad, fast_grad)


def test_seql_module_fast_path(recorder):
    module = ltfast.nn.SoftmaxEqualizationLoss(COUNTS, gamma=0.5, count_threshold=10)
    logits, target = _inputs()[:2]
    _fast_then_declined(recorder, lambda x: module(x, target), logits)


def test_balanced_softmax_matches_cross_entropy_through_fast_path(recorder):
    logits, target, prior, _, _ = _inputs(torch.float64)
    loss, grad = _run(lambda x: ltfast.balanced_softmax_loss(x, target, prior.double()), logits)
    want_loss, want_grad = _run(lambda x: F.cross_entropy(x + prior.double(), target), logits)
    assert all(taken for _, taken in recorder.calls)
    torch.testing.assert_close(loss, want_loss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-14, atol=1e-14)


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("case", ["bad target", "bad prior", "bad reduction", "1-D logits", "device"])
def test_errors_identical_to_torch_ops(case):
    logits, target, prior, _, _ = _inputs()
    args = {
        "bad target": (logits, torch.tensor([0, 1, 2, 3, 4, 9]), prior, "mean", -100),
        "bad prior": (logits, target, prior[:3], "mean", -100),
        "bad reduction": (logits, target, prior, "avg", -100),
        "1-D logits": (logits[0], target, prior, "mean", -100),
        "device": (logits, target, prior.to("meta"), "mean", -100),
    }[case]
    fast = ltfast._dispatch.fast.balanced_softmax
    got = _error(lambda: fast(*args))
    want = _error(lambda: torch.ops.ltfast.balanced_softmax.default(*args))
    assert got == want


def test_entry_points_decline_unexpected_argument_types():
    logits, target, prior, tail, seed = _inputs()
    fast = ltfast._dispatch.fast
    assert fast.balanced_softmax(logits, target, prior, "mean", True) is NotImplemented
    assert fast.balanced_softmax(logits, target, prior, b"mean", -100) is NotImplemented
    assert fast.balanced_softmax(logits, target, prior.tolist(), "mean", -100) is NotImplemented
    assert fast.balanced_softmax(logits, target, prior, "mean") is NotImplemented
    assert fast.balanced_softmax(logits, target, prior, "mean", 2**70) is NotImplemented
    assert fast.adjusted_cross_entropy(logits, target, None, None, None, "0", 0.0, "mean", -100) is NotImplemented
    assert fast.equalization_loss(logits, target, tail, "mean", -100) is not NotImplemented
    # Parameters have no __torch_function__ of their own: taken.
    assert fast.balanced_softmax(torch.nn.Parameter(logits), target, prior, "mean", -100) is not NotImplemented
    # Through the functionals the generic path then raises its usual errors.
    with pytest.raises(Exception):
        ltfast.balanced_softmax_loss(logits, target, prior, "mean", "x")


def test_fast_path_self_check_accepts_the_built_entry_points():
    # The import-time check (ltfast/_extension.py) passed on this torch: the functionals use _C.
    assert ltfast._dispatch.fast is ltfast._C
    assert ltfast._extension._fast_path_declines_under_a_mode(ltfast._C)


class _IgnoresModes:
    """Entry points as they would behave if torch's torch-function TLS changed under the fast path:
    they run the op even under a TorchFunctionMode."""

    def balanced_softmax(self, *args):
        return torch.ops.ltfast.balanced_softmax.default(*args)


class _Raises:
    def balanced_softmax(self, *args):
        raise RuntimeError("internals moved")


@pytest.mark.parametrize("entry_points, problem", [(_IgnoresModes(), "did not decline under a TorchFunctionMode"),
                                                   (_Raises(), "raised RuntimeError: internals moved")])
def test_fast_path_self_check_turns_off_a_misbehaving_fast_path(entry_points, problem):
    with pytest.warns(RuntimeWarning, match=problem + r".*every call takes the dispatcher path"):
        assert not ltfast._extension._fast_path_declines_under_a_mode(entry_points)


def test_fast_path_can_be_turned_off_by_environment():
    import os
    import subprocess
    import sys
    code = ("import ltfast, ltfast._dispatch, torch; assert ltfast._dispatch.fast is not ltfast._C; "
            "x = torch.randn(4, 3, requires_grad=True); y = torch.tensor([0, 1, 2, 1]); "
            "ltfast.balanced_softmax_loss(x, y, torch.zeros(3)).backward(); print('dispatcher path ok')")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LTFAST_FAST_PATH": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dispatcher path ok" in out.stdout
