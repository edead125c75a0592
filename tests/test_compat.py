"""ltfast.compat: every drop-in class against a plain-PyTorch transcription of the survey original
(tests/_survey_originals.py), values and gradients, on CPU in float32 and float64, odd batch sizes,
classes absent from the batch (and from the training set where the original allows it)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from ltfast.compat import ensemble, survey

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _survey_originals as orig  # noqa: E402

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
# (N, C, absent): odd batch sizes; "absent" draws the targets from a third of the classes only.
BATCHES = [pytest.param(1, 10, False, id="1x10"), pytest.param(7, 10, True, id="7x10-absent"),
           pytest.param(33, 37, False, id="33x37"), pytest.param(129, 100, True, id="129x100-absent")]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def profile_counts(num_classes, n_max=1280, ratio=256, zero_last=False):
    """ImageNet-LT-like exponential counts (n_max down to n_max / ratio), optionally with the last
    class empty."""
    counts = [max(1, int(n_max * (1.0 / ratio) ** (c / max(num_classes - 1, 1)))) for c in range(num_classes)]
    if zero_last:
        counts[-1] = 0
    return counts


def write_list_file(tmp_path, counts, name="train.txt", shuffle_seed=0):
    lines = [f"train/n{c:08d}/img_{c}_{k}.JPEG {c}\n" for c, n in enumerate(counts) for k in range(n)]
    gen = torch.Generator().manual_seed(shuffle_seed)
    lines = [lines[i] for i in torch.randperm(len(lines), generator=gen).tolist()]
    path = tmp_path / name
    path.write_text("".join(lines))
    return str(path)


def make_batch(n, c, absent, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + c)
    logits = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    pool = torch.randperm(c, generator=gen)[: max(1, c // 3)] if absent else torch.arange(c)
    target = pool[torch.randint(0, len(pool), (n,), generator=gen)]
    return logits, target


def value_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def assert_same(ours, original, logits, *args, **kwargs):
    loss, grad = value_and_grad(ours, logits, *args, **kwargs)
    ref_loss, ref_grad = value_and_grad(original, logits, *args, **kwargs)
    tol = TOL[logits.dtype]
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


# ============================================================================ Main-codebase
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
def test_softmax_loss(n, c, absent, dtype):
    module = importlib.import_module("ltfast.compat.survey.SoftmaxLoss")
    assert_same(module.create_loss(), orig.OriginalSoftmaxLoss(), *make_batch(n, c, absent, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
def test_weighted_softmax_loss(tmp_path, n, c, absent, dtype):
    path = write_list_file(tmp_path, profile_counts(c))
    ours = survey.WeightedSoftmaxLoss(prior_txt=path, num_classes=c)
    original = orig.OriginalWeightedSoftmaxLoss(path, num_classes=c)
    assert torch.equal(ours.weight, original.weight)  # same float32 arithmetic, bit for bit
    assert_same(ours, original, *make_batch(n, c, absent, dtype))


def test_weighted_softmax_loss_defaults_to_the_hard_coded_path(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data" / "ImageNet_LT")
    counts = profile_counts(1000, n_max=20, ratio=4)
    write_list_file(tmp_path / "data" / "ImageNet_LT", counts, name="ImageNet_LT_train.txt")
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module("ltfast.compat.survey.WeightedSoftmaxLoss")
    ours = module.create_loss()
    original = orig.OriginalWeightedSoftmaxLoss("./data/ImageNet_LT/ImageNet_LT_train.txt")
    assert torch.equal(ours.weight, original.weight)


def prior_sources(tmp_path, c, source):
    """Constructor kwargs for both implementations: a list file, or the img_max/prior profile (whose
    int() truncation leaves the last classes with 0 images at these settings)."""
    if source == "txt":
        return {"prior_txt": write_list_file(tmp_path, profile_counts(c))}
    return {"img_max": 40, "prior": 0.01}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("source", ["txt", "profile"])
def test_prior_ce_loss(tmp_path, n, c, absent, dtype, source):
    kwargs = prior_sources(tmp_path, c, source)
    ours, original = survey.PriorCELoss(c, **kwargs), orig.OriginalPriorCELoss(c, **kwargs)
    assert torch.equal(ours.prior, original.prior)
    if source == "profile" and c >= 37:
        assert (ours.img_num_per_cls == 0).any()  # empty training classes: log(1e-9), finite
    assert_same(ours, original, *make_batch(n, c, absent, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("source,remine_lambda", [("txt", 0.1), ("profile", 0.5), ("txt", 0.0)])
def test_lade_loss(tmp_path, n, c, absent, dtype, source, remine_lambda):
    kwargs = prior_sources(tmp_path, c, source)
    ours = survey.LADELoss(num_classes=c, remine_lambda=remine_lambda, **kwargs)
    original = orig.OriginalLADELoss(num_classes=c, remine_lambda=remine_lambda, **kwargs)
    logits, target = make_batch(n, c, absent, dtype)
    assert_same(ours, original, logits, target)
    # q_pred is accepted and ignored, as in the original
    torch.testing.assert_close(ours(logits, target, q_pred=logits * 2), original(logits, target), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_lade_loss_plain_pytorch_fallback(tmp_path, dtype):
    """The path taken where ltfast._C is not built computes the same terms with autograd."""
    from ltfast.compat import _lader
    c = 37
    ours = survey.LADELoss(num_classes=c, img_max=40, prior=0.01)
    original = orig.OriginalLADELoss(num_classes=c, img_max=40, prior=0.01)
    logits, target = make_batch(33, c, True, dtype)
    fallback = lambda x, y: _lader._lader_reference(x, y, ours.log_prior, ours.cls_weight,  # noqa: E731
                                                    ours.balanced_log_prior, ours.remine_lambda)
    assert_same(fallback, original, logits, target)


def test_lade_plus_prior_ce_as_in_lade_yaml(tmp_path):
    """lade.yaml: PerformanceLoss (PriorCE, weight 1) + RouteWeightLoss (LADELoss, weight 0.1)."""
    c = 100
    path = write_list_file(tmp_path, profile_counts(c))
    ce = importlib.import_module("ltfast.compat.survey.PriorCELoss").create_loss(num_classes=c, prior_txt=path)
    reg = importlib.import_module("ltfast.compat.survey.LADELoss").create_loss(num_classes=c, prior_txt=path,
                                                                               remine_lambda=0.1)
    o_ce, o_reg = orig.OriginalPriorCELoss(c, prior_txt=path), orig.OriginalLADELoss(c, prior_txt=path)
    logits, target = make_batch(257, c, False, torch.float64)
    assert_same(lambda x, y: ce(x, y) + 0.1 * reg(x, y), lambda x, y: o_ce(x, y) + 0.1 * o_reg(x, y), logits, target)


def seql_pair(tmp_path, c, gamma):
    counts = profile_counts(c, n_max=300, ratio=300)  # frequencies on both sides of lambda_n
    path = write_list_file(tmp_path, counts)
    lambda_n = 2.0 / c
    ours = survey.SEQL(gamma=gamma, lambda_n=lambda_n, prior_txt=path, num_classes=c)
    original = orig.OriginalSEQL(path, gamma=gamma, lambda_n=lambda_n, num_classes=c)
    assert torch.equal(ours.class_weight, original.class_weight)
    assert 0 < int(ours.tail_mask.sum()) < c
    return ours, original


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES[1:])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_seql_deterministic_gammas(tmp_path, n, c, absent, dtype, gamma):
    """gamma 0 keeps and gamma 1 drops every tail negative, in both implementations."""
    ours, original = seql_pair(tmp_path, c, gamma)
    logits, target = make_batch(n, c, absent, dtype)
    keep = torch.full((n, c), gamma == 0.0)
    assert_same(ours, lambda x, y: original(x, y, keep=keep), logits, target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES[1:])
def test_seql_replayed_drops(tmp_path, n, c, absent, dtype):
    """At gamma 0.9 the fused op's drops (the entries with exactly zero gradient) replayed in the
    original give the same value and gradients."""
    ours, original = seql_pair(tmp_path, c, 0.9)
    logits, target = make_batch(n, c, absent, dtype)
    torch.manual_seed(123)
    loss, grad = value_and_grad(ours, logits, target)
    keep = grad != 0
    dropped = ~keep & ours.tail_mask[None, :]
    assert dropped.any()
    ref_loss, ref_grad = value_and_grad(lambda x, y: original(x, y, keep=keep), logits, target)
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    torch.manual_seed(123)
    torch.testing.assert_close(ours(logits, target), loss)  # reproducible after torch.manual_seed


def test_seql_keep_rate(tmp_path):
    ours, _ = seql_pair(tmp_path, 100, 0.9)
    logits, target = make_batch(512, 100, False, torch.float32)
    torch.manual_seed(0)
    _, grad = value_and_grad(ours, logits, target)
    negatives = ours.tail_mask[None, :] & (target[:, None] != torch.arange(100)[None, :])
    kept = (grad[negatives] != 0).double().mean().item()
    stderr = (0.1 * 0.9 / negatives.sum().item()) ** 0.5
    assert abs(kept - 0.1) < 4 * stderr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("gamma,size_average", [(0.0, True), (1.0, False), (3.0, True)])
def test_main_focal_loss(n, c, absent, dtype, gamma, size_average):
    ours = survey.FocalLoss(gamma=gamma, size_average=size_average)
    assert_same(ours, orig.OriginalFocalLoss(gamma, size_average), *make_batch(n, c, absent, dtype, scale=1.0))


def test_main_focal_loss_create_loss_and_spatial_input():
    ours = importlib.import_module("ltfast.compat.survey.FocalLoss").create_loss()
    assert ours.gamma == 3.0
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 2, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 7, (3, 2, 5), generator=gen)
    assert_same(ours, orig.OriginalFocalLoss(3.0), logits, target)


# ============================================================================ Ensemble-codebase
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("reweight_CE", [False, True])
def test_ensemble_cross_entropy(n, c, absent, dtype, reweight_CE):
    counts = profile_counts(c)
    ours = ensemble.CrossEntropyLoss(cls_num_list=counts, reweight_CE=reweight_CE)
    original = orig.OriginalEnsembleCrossEntropyLoss(cls_num_list=counts, reweight_CE=reweight_CE)
    if reweight_CE:
        assert torch.equal(ours.per_cls_weights, original.per_cls_weights)
    assert_same(ours, original, *make_batch(n, c, absent, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("gamma,weighted", [(0.0, False), (0.5, True), (2.0, False), (2.0, True)])
def test_ensemble_focal(n, c, absent, dtype, gamma, weighted):
    weight = orig.class_balanced_weights(profile_counts(c)) if weighted else None
    ours = ensemble.FocalLoss(cls_num_list=profile_counts(c), weight=weight, gamma=gamma)
    original = orig.OriginalEnsembleFocalLoss(weight=weight, gamma=gamma)
    ours._hook_before_epoch(3)
    assert_same(ours, original, *make_batch(n, c, absent, dtype, scale=1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("reweight_epoch,epochs", [(-1, [1, 200]), (160, [1, 160, 161, 200, 5])])
def test_ldam_drw(n, c, absent, dtype, reweight_epoch, epochs):
    counts = profile_counts(c)
    ours = ensemble.LDAMLoss(cls_num_list=counts, reweight_epoch=reweight_epoch)
    original = orig.OriginalLDAMLoss(cls_num_list=counts, reweight_epoch=reweight_epoch)
    assert torch.equal(ours.m_list, original.m_list)
    logits, target = make_batch(n, c, absent, dtype, scale=10.0)
    for epoch in epochs:
        ours._hook_before_epoch(epoch)
        original._hook_before_epoch(epoch)
        assert (ours.per_cls_weights is None) == (original.per_cls_weights is None)
        assert (ours.per_cls_weights is not None) == (reweight_epoch != -1 and epoch > reweight_epoch)
        assert_same(lambda x, y: ours(output_logits=x, target=y), original, logits, target)


def test_ldam_without_counts_is_cross_entropy():
    ours = ensemble.LDAMLoss()
    ours._hook_before_epoch(500)  # a no-op (the original raises AttributeError)
    assert_same(ours, orig.OriginalSoftmaxLoss(), *make_batch(33, 37, False, torch.float64))


def experts_extra_info(n, c, dtype, absent, seed=0):
    """The trainer's extra_info: the [N, 3, C] expert logits, transposed to [3, N, C] (strided)."""
    gen = torch.Generator().manual_seed(seed + n)
    stacked = (torch.randn(n, 3, c, generator=gen, dtype=torch.float64) * 3).to(dtype)
    _, target = make_batch(n, c, absent, dtype, seed=seed)
    return stacked, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,absent", BATCHES)
@pytest.mark.parametrize("tau", [2, 1.5])
def test_diverse_expert_loss(n, c, absent, dtype, tau):
    counts = profile_counts(c, zero_last=True)
    counts[1] = counts[2]  # tied priors: the inverse prior follows torch.sort's order
    ours = ensemble.DiverseExpertLoss(cls_num_list=counts, tau=tau)
    original = orig.OriginalDiverseExpertLoss(cls_num_list=counts, tau=tau)
    assert torch.equal(ours.inverse_prior_values, original.reversed_rank_values(original.prior))
    stacked, target = experts_extra_info(n, c, dtype, absent)

    def run(loss_fn):
        x = stacked.detach().clone().requires_grad_(True)
        output = x.mean(1)
        loss = loss_fn(output_logits=output, target=target, extra_info={"logits": x.transpose(0, 1)})
        loss.backward()
        return loss.detach(), x.grad

    (loss, grad), (ref_loss, ref_grad) = run(ours), run(original)
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    # validation: no extra_info, plain CE on the aggregated logits
    assert_same(lambda x, y: ours(x, y), lambda x, y: original(x, y), stacked.mean(1), target)


def test_diverse_expert_inverse_prior():
    prior = torch.tensor([0.5, 0.1, 0.3, 0.1])
    inverse = ensemble.DiverseExpertLoss.inverse_prior(prior)
    assert torch.equal(inverse, orig.OriginalDiverseExpertLoss.reversed_rank_values(prior))
    assert inverse[0] == 0.1 and inverse[2] == 0.1 and sorted(inverse.tolist()) == sorted(prior.tolist())


# ============================================================================ PaCo-codebase
def paco_batch(batch, queue, num_classes, dtype, seed=0, absent=False):
    """PaCo's features [q, k, queue] (unit rows, N = 2B + K), their labels and sup_logits [B, C]."""
    gen = torch.Generator().manual_seed(seed + 31 * batch + queue)
    q = torch.randn(batch, 12, generator=gen, dtype=torch.float64)
    features = torch.cat([q, q + 0.3 * torch.randn(batch, 12, generator=gen, dtype=torch.float64),
                          torch.randn(queue, 12, generator=gen, dtype=torch.float64)])
    features = torch.nn.functional.normalize(features, dim=1).to(dtype)
    high = max(1, num_classes // 3) if absent else num_classes
    anchor_labels = torch.randint(0, high, (batch,), generator=gen)
    labels = torch.cat([anchor_labels, anchor_labels, torch.randint(0, num_classes, (queue,), generator=gen)])
    sup_logits = (torch.randn(batch, num_classes, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return features, labels, sup_logits


PACO_CONFIGS = [pytest.param(dict(alpha=0.05, temperature=0.07), id="x50-recipe"),  # sh/ImageNetLT_train_X50.sh
                pytest.param(dict(alpha=0.5, beta=0.5, gamma=0.0, supt=2.0, temperature=0.2, base_temperature=0.1),
                             id="weights")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,queue", [(1, 0), (7, 0), (5, 40), (33, 257)], ids=["B1-K0", "B7-K0", "B5-K40",
                                                                                  "B33-K257"])
@pytest.mark.parametrize("config", PACO_CONFIGS)
def test_paco_loss(batch, queue, config, dtype):
    from ltfast.compat.paco import PaCoLoss
    num_classes = 37
    counts = profile_counts(num_classes, zero_last=True)
    ours = PaCoLoss(K=queue, num_classes=num_classes, **config)
    original = orig.OriginalPaCoLoss(K=queue, num_classes=num_classes, **config)
    ours.cal_weight_for_classes(counts)
    original.cal_weight_for_classes(counts)
    assert torch.equal(ours.weight, original.weight)
    features, labels, sup_logits = paco_batch(batch, queue, num_classes, dtype, absent=batch > 5)

    def run(loss_fn):
        f = features.detach().clone().requires_grad_(True)
        s = sup_logits.detach().clone().requires_grad_(True)
        loss = loss_fn(f, labels, sup_logits=s)
        loss.backward()
        return loss.detach(), f.grad, s.grad

    got, want = run(ours), run(original)
    assert got[0].dtype == dtype
    for value, expected in zip(got, want):
        torch.testing.assert_close(value, expected, **TOL[dtype])


@pytest.mark.parametrize("config", PACO_CONFIGS)
def test_paco_reference_matches_the_original(config):
    """ltfast.reference.paco_loss (the op's test oracle) against the transcription of the original."""
    from ltfast import reference
    original = orig.OriginalPaCoLoss(K=40, num_classes=11, **config)
    original.cal_weight_for_classes(profile_counts(11))
    features, labels, sup_logits = paco_batch(7, 40, 11, torch.float64)
    options = dict(config)
    options["sup_temperature"] = options.pop("supt", 1.0)
    want = original(features, labels, sup_logits=sup_logits)
    got = reference.paco_loss(features[:7] @ features.T, labels[:7], labels, sup_logits,
                              torch.log(original.weight + 1e-9).view(-1), **options)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_paco_loss_arguments():
    from ltfast.compat.paco import PaCoLoss
    loss = PaCoLoss(alpha=0.05, K=4, num_classes=5)
    features, labels, sup_logits = paco_batch(3, 4, 5, torch.float32)
    with pytest.raises(RuntimeError, match="call cal_weight_for_classes"):
        loss(features, labels, sup_logits=sup_logits)
    loss.cal_weight_for_classes([5, 4, 3, 2, 1])
    with pytest.raises(ValueError, match="PaCoLoss: mask is not supported"):
        loss(features, labels, sup_logits=sup_logits, mask=torch.ones(3, 10))
    with pytest.raises(ValueError, match="PaCoLoss: labels .* are required"):
        loss(features, sup_logits=sup_logits)
    with pytest.raises(ValueError, match="PaCoLoss: labels must have N = 10"):
        loss(features, labels[:-1], sup_logits=sup_logits)
    with pytest.raises(ValueError, match=r"PaCoLoss: sup_logits must be \[B = 3, num_classes = 5\]"):
        loss(features, labels, sup_logits=sup_logits[:, :4])
    with pytest.raises(ValueError, match="too few for K = 4"):
        loss(features[:5], labels[:5], sup_logits=sup_logits)
    with pytest.raises(ValueError, match="cls_num_list must have num_classes = 5"):
        loss.cal_weight_for_classes([1, 2])
    for bad in (dict(alpha=-1.0), dict(alpha=0.1, temperature=0.0), dict(alpha=0.1, K=-1),
                dict(alpha=0.1, num_classes=0), dict(alpha=0.1, supt=float("nan"))):
        with pytest.raises(ValueError, match="PaCoLoss: "):
            PaCoLoss(**bad)
    # Any device and any order: the prior follows .to(); epoch is accepted and unused, as in the original.
    loss = loss.to(torch.float64)
    value = loss(features.double(), labels, sup_logits=sup_logits.double(), epoch=3)
    assert value.dtype == torch.float64 and torch.isfinite(value)
    # No sup_logits: the key columns only (the original fails there).
    assert torch.isfinite(loss(features, labels))


# ============================================================================ plumbing
@pytest.mark.parametrize("reverse", [False, True])
def test_calculate_prior_profile(reverse):
    ours = survey.calculate_prior(10, img_max=500, prior=0.01, reverse=reverse, return_num=True)
    assert torch.equal(ours, orig.survey_counts(10, 500, 0.01, reverse=reverse))
    assert ours.dtype == torch.float32
    prior = survey.calculate_prior(10, img_max=500, prior=0.01, reverse=reverse)
    torch.testing.assert_close(prior.sum(), torch.tensor(1.0))


def test_calculate_prior_list_file(tmp_path):
    counts = profile_counts(20)
    path = write_list_file(tmp_path, counts)
    with open(path, "a") as f:
        f.write("\nval/extra.JPEG 25\n")  # blank line skipped; labels >= num_classes not counted
    assert survey.calculate_prior(20, prior_txt=path, return_num=True).tolist() == counts


@pytest.mark.parametrize("name", survey.MODULES)
def test_def_file_loads_like_source_import(name):
    """The Main-codebase loads def_file with importlib.util.spec_from_file_location('', path)."""
    path = survey.def_file(name)
    assert os.path.isfile(path) and survey.def_file(name + ".py") == path
    spec = importlib.util.spec_from_file_location("", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.create_loss)


def test_buffers_follow_the_module_and_state_dicts_match_the_originals(tmp_path):
    c = 10
    path = write_list_file(tmp_path, profile_counts(c))
    modules = [survey.PriorCELoss(c, prior_txt=path), survey.LADELoss(c, prior_txt=path),
               survey.SEQL(prior_txt=path, num_classes=c), ensemble.LDAMLoss(profile_counts(c), reweight_epoch=1),
               ensemble.DiverseExpertLoss(profile_counts(c)), ensemble.CrossEntropyLoss(profile_counts(c), True)]
    for module in modules:
        assert module.state_dict() == {}, type(module).__name__  # the originals hold plain attributes
        moved = module.to(torch.float64).to("meta")
        assert all(b.device.type == "meta" for b in moved.buffers()), type(module).__name__
    weighted = survey.WeightedSoftmaxLoss(prior_txt=path, num_classes=c)
    assert list(weighted.state_dict()) == list(torch.nn.CrossEntropyLoss(weight=weighted.weight).state_dict())


def test_ldam_reweighting_follows_to():
    loss = ensemble.LDAMLoss(profile_counts(10), reweight_epoch=0)
    loss._hook_before_epoch(1)
    loss = loss.to("meta")
    assert loss.per_cls_weights.device.type == "meta"


# ============================================================================ bad input
@pytest.mark.parametrize("build,message", [
    (lambda p: survey.PriorCELoss(10), "prior_txt"),
    (lambda p: survey.PriorCELoss(0, prior_txt=p), "num_classes"),
    (lambda p: survey.PriorCELoss(10, img_max=100), "img_max"),
    (lambda p: survey.PriorCELoss(10, img_max=100, prior=-0.1), "prior"),
    (lambda p: survey.PriorCELoss(12, prior_txt=p), "no line for classes [10, 11]"),
    (lambda p: survey.PriorCELoss(10, prior_txt=p + ".missing"), "prior_txt"),
    (lambda p: survey.LADELoss(10), "prior_txt"),
    (lambda p: survey.LADELoss(10, prior_txt=p, remine_lambda=-1), "remine_lambda"),
    (lambda p: survey.SEQL(gamma=1.5, prior_txt=p, num_classes=10), "gamma"),
    (lambda p: survey.SEQL(prior_txt=p + ".missing", num_classes=10), "prior_txt"),
    (lambda p: survey.FocalLoss(gamma=-1), "gamma"),
    (lambda p: survey.FocalLoss(alpha=0.25), "alpha"),
    (lambda p: survey.WeightedSoftmaxLoss(prior_txt=p, num_classes=11), "no line for classes [10]"),
    (lambda p: ensemble.CrossEntropyLoss(reweight_CE=True), "cls_num_list"),
    (lambda p: ensemble.LDAMLoss([10, 0, 3]), "cls_num_list"),
    (lambda p: ensemble.LDAMLoss([10, 5, 3], s=0), "s must"),
    (lambda p: ensemble.FocalLoss(gamma=-0.5), "gamma"),
    (lambda p: ensemble.DiverseExpertLoss(), "cls_num_list"),
    (lambda p: ensemble.DiverseExpertLoss([[1, 2], [3, 4]]), "cls_num_list"),
])
def test_bad_constructor_arguments(tmp_path, build, message):
    path = write_list_file(tmp_path, profile_counts(10))
    pattern = message.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=pattern):
        build(path)


def test_bad_list_file_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(ValueError, match="line 2"):
        survey.PriorCELoss(1, prior_txt=str(path))


def test_bad_forward_arguments(tmp_path):
    path = write_list_file(tmp_path, profile_counts(10))
    logits, target = make_batch(7, 10, False, torch.float32)
    with pytest.raises(ValueError, match="num_classes = 12"):
        survey.PriorCELoss(12, img_max=100, prior=0.1)(logits, target)
    with pytest.raises(ValueError, match="y_pred"):
        survey.LADELoss(10, prior_txt=path)(logits[0], target)
    with pytest.raises(ValueError, match="target"):
        survey.LADELoss(10, prior_txt=path)(logits, target[:3])
    with pytest.raises(ValueError, match="output_logits"):
        ensemble.LDAMLoss(profile_counts(12))(logits, target)
    loss = ensemble.DiverseExpertLoss(profile_counts(10))
    with pytest.raises(ValueError, match="3 experts"):
        loss(logits, target, extra_info={"logits": [logits, logits]})
    with pytest.raises(ValueError, match=r"extra_info\['logits'\]\[2\]"):
        loss(logits, target, extra_info={"logits": [logits, logits, logits[:, :5]]})
    with pytest.raises(ValueError, match="extra_info"):
        loss(logits, target, extra_info={"experts": []})
    with pytest.raises(Exception, match="target"):
        survey.SoftmaxLoss()(logits, torch.full((7,), 10))


def test_ignore_index_rows_are_left_out():
    """Rows with target -100 count nowhere (nn.CrossEntropyLoss's default ignore_index)."""
    counts = profile_counts(10)
    logits, target = make_batch(9, 10, False, torch.float64)
    partial = target.clone()
    partial[::3] = -100
    kept = partial != -100
    for ours in (ensemble.LDAMLoss(counts), survey.PriorCELoss(10, img_max=100, prior=0.1),
                 survey.LADELoss(10, img_max=100, prior=0.1)):
        torch.testing.assert_close(ours(logits, partial), ours(logits[kept], partial[kept]))
