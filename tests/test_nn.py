"""ltfast.nn modules: drop-in for nn.CrossEntropyLoss, buffers, DRW, class statistics, fallback."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ltfast
from ltfast import priors, reference

COUNTS = [1280, 640, 300, 120, 60, 25, 10, 5]


def inputs(N=33, C=len(COUNTS), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen) * 2
    y = torch.randint(0, C, (N,), generator=gen)
    y[3] = -100
    return x, y


def test_priors_follow_the_survey():
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    pi = counts / counts.sum()
    torch.testing.assert_close(priors.log_prior(COUNTS), torch.log(pi + 1e-9).float())
    torch.testing.assert_close(priors.survey_class_weights(COUNTS), (1 + torch.log(1280 / counts)).float())
    assert priors.survey_class_weights(COUNTS)[-1].item() == pytest.approx(1 + math.log(256))
    margins = priors.ldam_margins(COUNTS, 0.5)
    torch.testing.assert_close(margins, (0.5 * (5 / counts) ** 0.25).float())
    cb = priors.effective_number_weights(COUNTS, 0.9999)
    raw = (1 - 0.9999) / (1 - 0.9999 ** counts)
    torch.testing.assert_close(cb, (raw / raw.sum() * len(COUNTS)).float())
    assert cb.sum().item() == pytest.approx(len(COUNTS), rel=1e-5)


def test_zero_count_classes():
    counts = [10, 0, 3]
    lp = priors.log_prior(counts)  # documented finite treatment: log(0 + 1e-9)
    assert torch.isfinite(lp).all() and lp[1].item() == pytest.approx(math.log(1e-9), rel=1e-6)
    for make in (priors.survey_class_weights, priors.effective_number_weights, priors.ldam_margins,
                 lambda c: ltfast.nn.WeightedCrossEntropyLoss(c), lambda c: ltfast.nn.LDAMLoss(c)):
        with pytest.raises(ValueError, match=r"zero training samples \(indices \[1\]\)"):
            make(counts)
    for bad in ([], [[1, 2]], [1, -2], [0, 0], [1, float("nan")]):
        with pytest.raises(ValueError, match="class_counts"):
            priors.as_counts(bad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_modules_match_reference(reduction, label_smoothing):
    x, y = inputs()
    common = dict(reduction=reduction, label_smoothing=label_smoothing)
    lp = priors.log_prior(COUNTS)
    cases = [
        (ltfast.nn.BalancedSoftmaxLoss(COUNTS, **common), dict(adjustment=lp)),
        (ltfast.nn.LogitAdjustedLoss(COUNTS, tau=0.7, **common), dict(adjustment=0.7 * lp)),
        (ltfast.nn.WeightedCrossEntropyLoss(COUNTS, **common), dict(weight=priors.survey_class_weights(COUNTS))),
        (ltfast.nn.WeightedCrossEntropyLoss(COUNTS, "effective_number", beta=0.999, **common),
         dict(weight=priors.effective_number_weights(COUNTS, 0.999))),
        (ltfast.nn.LDAMLoss(COUNTS, **common), dict(target_margin=30 * priors.ldam_margins(COUNTS))),
    ]
    if label_smoothing == 0.0:
        cases.append((ltfast.nn.FocalLoss(3.0, reduction=reduction), dict(gamma=3.0)))
    for module, kwargs in cases:
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        got = module(a, y)
        want = reference.adjusted_cross_entropy(b, y, reduction=reduction, ignore_index=-100,
                                                label_smoothing=0.0 if "gamma" in kwargs else label_smoothing,
                                                **kwargs)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=lambda m: f"{module}: {m}")
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=2e-6)


def test_drop_in_for_cross_entropy_loss():
    """Swapping nn.CrossEntropyLoss for a module built from counts changes nothing else."""
    x, y = inputs()
    baseline = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.05)
    uniform = ltfast.nn.BalancedSoftmaxLoss([7] * len(COUNTS), ignore_index=-100, label_smoothing=0.05)
    # a uniform prior shifts every logit by the same constant: the loss is plain cross-entropy
    torch.testing.assert_close(uniform(x, y), baseline(x, y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ltfast.nn.FocalLoss(0.0)(x, y), nn.CrossEntropyLoss()(x, y), rtol=1e-5, atol=1e-6)
    w = priors.survey_class_weights(COUNTS)
    torch.testing.assert_close(ltfast.nn.WeightedCrossEntropyLoss(COUNTS)(x, y), nn.CrossEntropyLoss(weight=w)(x, y),
                               rtol=1e-5, atol=1e-6)


def test_buffers_follow_module_and_state_dict():
    module = ltfast.nn.LDAMLoss(COUNTS, drw_epoch=2)
    assert set(module.state_dict()) == {"target_margin", "drw_weight", "_extra_state"}
    module.to(torch.float64)  # buffers are float tensors like any module's
    module.set_epoch(5)
    restored = ltfast.nn.LDAMLoss(COUNTS, drw_epoch=2)
    restored.load_state_dict(module.state_dict())
    assert restored.epoch == 5 and restored.reweighting
    bs = ltfast.nn.BalancedSoftmaxLoss(COUNTS)
    assert "log_prior" in bs.state_dict()
    assert "num_classes=8" in repr(bs)


def test_ldam_drw_switches_on_at_drw_epoch():
    x, y = inputs()
    module = ltfast.nn.LDAMLoss(COUNTS, max_margin=0.5, s=30, drw_epoch=3, beta=0.9999)
    margin = 30 * priors.ldam_margins(COUNTS)
    before = reference.adjusted_cross_entropy(x, y, target_margin=margin)
    after = reference.adjusted_cross_entropy(x, y, target_margin=margin,
                                             weight=priors.effective_number_weights(COUNTS, 0.9999))
    for epoch, expected in [(0, before), (2, before), (3, after), (10, after)]:
        module.set_epoch(epoch)
        torch.testing.assert_close(module(x, y), expected, rtol=1e-5, atol=1e-6)
    never = ltfast.nn.LDAMLoss(COUNTS)
    never.set_epoch(1000)
    torch.testing.assert_close(never(x, y), before, rtol=1e-5, atol=1e-6)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="reduction must be"):
        ltfast.nn.BalancedSoftmaxLoss(COUNTS, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ltfast.nn.BalancedSoftmaxLoss(COUNTS, label_smoothing=2.0)
    with pytest.raises(ValueError, match="scheme must be"):
        ltfast.nn.WeightedCrossEntropyLoss(COUNTS, scheme="inverse")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        ltfast.nn.FocalLoss(-1.0)
    with pytest.raises(ValueError, match=r"log_prior must be a 1-D tensor of C = 3 elements"):
        ltfast.nn.BalancedSoftmaxLoss(COUNTS)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_fallback_to_reference_warns_once(monkeypatch):
    x, y = inputs()
    expected = ltfast.nn.BalancedSoftmaxLoss(COUNTS)(x, y)
    monkeypatch.setattr(ltfast._extension, "AVAILABLE", False)
    monkeypatch.setattr(ltfast._extension, "LOAD_ERROR", "simulated")
    monkeypatch.setattr(ltfast._extension, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ltfast.nn.BalancedSoftmaxLoss(COUNTS)(x, y)
        ltfast.nn.LDAMLoss(COUNTS)(x, y)
    assert len([w for w in caught if "compiled kernels are unavailable (simulated)" in str(w.message)]) == 1
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)


def test_training_step_reduces_loss():
    """A few SGD steps of a linear classifier with the fused loss behave like with F.cross_entropy."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, :8].argmax(1))
    model = nn.Linear(16, 8)
    criterion = ltfast.nn.BalancedSoftmaxLoss(COUNTS)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("make_module, reference_loss", [
    (lambda: ltfast.nn.LogitAdjustedLoss(COUNTS, tau=1.5),
     lambda x, y, pi: F.cross_entropy(x + 1.5 * torch.log(pi + 1e-9), y)),
    (lambda: ltfast.nn.BalancedSoftmaxLoss(COUNTS, label_smoothing=0.1),
     lambda x, y, pi: F.cross_entropy(x + torch.log(pi + 1e-9), y, label_smoothing=0.1)),
    (lambda: ltfast.nn.WeightedCrossEntropyLoss(COUNTS),
     lambda x, y, pi: F.cross_entropy(x, y, weight=1 + torch.log(pi.max() / pi))),
    (lambda: ltfast.nn.LDAMLoss(COUNTS, s=30.0),
     lambda x, y, pi: F.cross_entropy(
         x - 30 * F.one_hot(y.clamp(min=0), len(COUNTS)) * (0.5 * (pi.min() / pi) ** 0.25)[y.clamp(min=0)][:, None],
         y)),
])
def test_float64_modules_match_a_float64_reference(make_module, reference_loss):
    # The buffers are computed in float64 and cast at use: in float32 they left LogitAdjustedLoss
    # (tau = 1.5, 7 x 1000 in the review) 5e-7 relative away from a float64 reference.
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    pi = counts / counts.sum()
    x, y = inputs(N=7)
    x = x.double()
    module = make_module()
    expected = reference_loss(x, y, pi)
    torch.testing.assert_close(module(x, y), expected, rtol=1e-12, atol=1e-12)
    assert module(x.float(), y).dtype == torch.float32
    torch.testing.assert_close(module(x.float(), y), expected.float(), rtol=1e-5, atol=1e-6)


def test_focal_loss_defaults_to_the_papers_gamma_and_shows_it():
    focal = ltfast.nn.FocalLoss()
    assert focal.gamma == 2.0 and "gamma=2.0" in repr(focal)
    assert "gamma=0.9" in repr(ltfast.nn.FocalLoss(0.9))


def test_ldam_scale_logits_is_the_original_cosine_form():
    # CE(s * (z - m_y e_y)) with m = max_margin * (n_min / n_c)^(1/4): the original LDAM-DRW code.
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    x, y = inputs(N=9)
    cosines = torch.tanh(x.double())
    margins = 0.5 * (counts.min() / counts) ** 0.25
    safe = y.clamp(min=0)
    expected = F.cross_entropy(30.0 * (cosines - F.one_hot(safe, len(COUNTS)) * margins[safe][:, None]), y)
    module = ltfast.nn.LDAMLoss(COUNTS, max_margin=0.5, s=30.0, scale_logits=True)
    torch.testing.assert_close(module(cosines, y), expected, rtol=1e-12, atol=1e-12)
    assert "scale_logits=True" in repr(module)


def test_lade_loss_weight_and_label_smoothing_act_on_the_prior_ce_term():
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    log_prior = torch.log(counts / counts.sum() + 1e-9)
    x, y = inputs(N=17)
    x = x.double()
    weight = torch.linspace(0.5, 2.0, len(COUNTS), dtype=torch.float64)
    module = ltfast.nn.LADELoss(COUNTS, alpha=0.3, weight=weight, label_smoothing=0.1)
    expected = (F.cross_entropy(x + log_prior, y, weight=weight, label_smoothing=0.1)
                + 0.3 * reference.lade_regularizer(x, y, log_prior))
    torch.testing.assert_close(module(x, y), expected, rtol=1e-12, atol=1e-12)
    # without them it is the fused op, unchanged
    torch.testing.assert_close(ltfast.nn.LADELoss(COUNTS, alpha=0.3)(x, y), reference.lade(x, y, log_prior, 0.3),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        ltfast.nn.LADELoss(COUNTS, reduction="sum")
