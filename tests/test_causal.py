"""Causal / De-confound TDE (ltfast.train.methods.causal) against seed-methods.md §1.6: the multi-head
normalised logits and the TDE logits on hand-sized tensors (computed here independently, in float64
with plain Python arithmetic), the moving-average rule, the buffer in checkpoints and on resume, and
TDE at evaluation (trainer and ``python -m ltfast.evaluate``)."""
import json
import math

import pytest
import torch

from ltfast.train import load_config, train
from ltfast.train.methods.causal import CausalNormClassifier, FeatureAverageUpdater, moving_average_momentum
from ltfast.train.evaluation import collect, main
from ltfast.train import methods
from ltfast.train.models import build_model, find_head

from test_train import TINY

# 2 samples, D = 4 features in K = 2 heads of 2, C = 3 classes
X = [[3.0, 4.0, 1.0, 0.0], [-1.0, 2.0, 0.5, -0.5]]
W = [[1.0, 0.0, 0.0, 2.0], [0.5, 0.5, -1.0, 1.0], [0.0, -3.0, 4.0, 0.0]]
E = [[2.0, 1.0, 0.0, 3.0]]          # the feature moving average
TAU, GAMMA, ALPHA, K = 16.0, 1.0 / 32, 3.0, 2


def _norm(v):
    return math.sqrt(sum(t * t for t in v))


def _heads(v):
    return [v[0:2], v[2:4]]


def _expected_logits(x_rows, alpha=None):
    """seed-methods.md §1.6 written out: z_c = (tau/K) sum_k <x̂_k (- alpha cos_k ĉ_k), ŵ_ck>."""
    out = []
    for x in x_rows:
        row = []
        for w in W:
            total = 0.0
            for xk, wk, ek in zip(_heads(x), _heads(w), _heads(E[0])):
                x_hat = [t / _norm(xk) for t in xk]
                w_hat = [t / (_norm(wk) + GAMMA) for t in wk]
                if alpha is not None:
                    c_hat = [t / _norm(ek) for t in ek]
                    cos = sum(a * b for a, b in zip(x_hat, c_hat))
                    x_hat = [a - alpha * cos * c for a, c in zip(x_hat, c_hat)]
                total += sum(a * b for a, b in zip(x_hat, w_hat))
            row.append(TAU / K * total)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def _classifier(alpha=ALPHA):
    clf = CausalNormClassifier(4, 3, num_heads=K, tau=TAU, gamma=GAMMA, alpha=alpha).double()
    with torch.no_grad():
        clf.weight.copy_(torch.tensor(W))
        clf.feature_average.copy_(torch.tensor(E[0]))
    return clf


def test_training_logits_match_the_formula():
    clf = _classifier().train()
    got = clf(torch.tensor(X, dtype=torch.float64))
    assert torch.allclose(got, _expected_logits(X), rtol=1e-12, atol=1e-12)


def test_tde_logits_at_eval_match_the_formula():
    clf = _classifier().eval()
    got = clf(torch.tensor(X, dtype=torch.float64))
    expected = _expected_logits(X, ALPHA)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected, _expected_logits(X))          # TDE changes these logits
    # alpha = 0: eval is the plain normalised classifier
    assert torch.allclose(_classifier(0.0).eval()(torch.tensor(X, dtype=torch.float64)), _expected_logits(X))


def test_init_and_shapes():
    torch.manual_seed(0)
    clf = CausalNormClassifier(2048, 1000)
    bound = 1 / math.sqrt(2048)
    assert clf.weight.shape == (1000, 2048) and clf.weight.abs().max() <= bound
    assert clf.weight.abs().max() > 0.99 * bound                     # uniform over the whole interval
    assert (clf.num_heads, clf.tau, clf.gamma, clf.alpha) == (2, 16.0, 0.03125, 3.0)
    assert torch.equal(clf.feature_average, torch.zeros(2048)) and "feature_average" in clf.state_dict()
    assert not any(name.endswith("bias") for name, _ in clf.named_parameters())
    with pytest.raises(ValueError, match="causal_heads"):
        CausalNormClassifier(10, 3, num_heads=3)
    with pytest.raises(ValueError, match=r"expected \[N, 4\]"):
        _classifier()(torch.zeros(2, 5, dtype=torch.float64))


def test_tde_without_a_moving_average_is_an_error():
    clf = CausalNormClassifier(4, 3).eval()
    with pytest.raises(RuntimeError, match="moving average"):
        clf(torch.randn(2, 4))


@pytest.mark.parametrize("lr, mu", [(0.1, 0.9), (0.02, 0.9), (0.01, 0.95), (0.001, 0.995), (0.0, 1.0)])
def test_momentum_rule(lr, mu):
    assert moving_average_momentum(lr) == pytest.approx(mu, abs=1e-12)


def test_moving_average_update_rule():
    model = torch.nn.Sequential(torch.nn.Identity(), CausalNormClassifier(4, 3))
    updater = FeatureAverageUpdater.for_model(model)
    batches = [torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 1.0]]),
               torch.tensor([[2.0, 2.0, 2.0, 2.0], [4.0, 0.0, 0.0, 2.0]])]
    lrs = [0.1, 0.01, 0.0]
    expected = [0.0] * 4
    model.train()
    for x, lr in zip(batches, lrs):
        model(x)
        updater.update(lr)
        mean = [sum(col) / len(x) for col in zip(*x.tolist())]
        expected = [moving_average_momentum(lr) * e + m for e, m in zip(expected, mean)]   # no (1 - mu) factor
        assert model[1].feature_average.tolist() == pytest.approx(expected, abs=1e-6)
    # by hand: means [2,2,2,2], [0,1,0,1], [3,1,1,2]; mu 0.9, 0.95, 1
    assert expected == pytest.approx([0.95 * 2 + 0 + 3, 0.95 * 2 + 1 + 1, 0.95 * 2 + 0 + 1, 0.95 * 2 + 1 + 2])
    model.eval()                      # evaluation forwards do not feed the average
    model(batches[0])
    with pytest.raises(RuntimeError, match="no training forward"):
        updater.update(0.1)
    assert FeatureAverageUpdater.for_model(torch.nn.Linear(4, 3)) is None


def test_install_from_config_and_head_rule():
    cfg = load_config(None, ["model.classifier=causal", "model.causal_heads=4", "model.causal_alpha=1.5"])
    model = build_model("small_resnet", 7, 1, 8)
    methods.build_head(model, 7, cfg)
    name, head = find_head(model, 7)
    assert name == "fc" and isinstance(head, CausalNormClassifier)
    assert (head.in_features, head.num_heads, head.alpha, head.tau) == (32, 4, 1.5, 16.0)


# ----------------------------------------------------------------------------------- end to end

CAUSAL = ["model.classifier=causal", "optim.epochs=2", "train.plot=false"]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("causal") / "run"
    summary = train(load_config(None, TINY + CAUSAL + [f"train.out_dir={out}"]))
    return out, summary


def test_causal_run_saves_the_average_and_tests_with_tde(causal_run, tmp_path):
    out, summary = causal_run
    assert summary["status"] == "finished"
    best = torch.load(out / "best.pt", weights_only=True)["model"]
    average = best["fc.feature_average"]
    assert average.shape == (32,) and average.norm() > 0
    # The trainer's test counts are the TDE predictions: recompute them from the features.
    cfg = load_config(None, TINY + CAUSAL + [f"train.out_dir={out}"])
    from ltfast.train.data import build_data
    data = build_data(cfg, 0, 1, torch.device("cpu"))
    model = build_model("small_resnet", 7, 1, 8)
    methods.build_head(model, 7, cfg)
    model.load_state_dict(best)
    got = collect(model, data["test_loader"], model.fc, torch.device("cpu"))
    clf = model.fc
    x_hat = torch.nn.functional.normalize(got["features"].double().view(-1, 2, 16), dim=2)
    c_hat = torch.nn.functional.normalize(average.double().view(1, 2, 16), dim=2)
    w = clf.weight.detach().double().view(7, 2, 16)
    w_hat = w / (w.norm(dim=2, keepdim=True) + 1 / 32)
    tde = x_hat - 3.0 * (x_hat * c_hat).sum(2, keepdim=True) * c_hat
    logits = 8.0 * torch.einsum("nkd,ckd->nc", tde, w_hat)
    assert torch.allclose(logits, got["logits"].double(), atol=1e-4)
    predicted = logits.argmax(1)
    correct = [int(((predicted == c) & (got["labels"] == c)).sum()) for c in range(7)]
    assert correct == summary["test"]["correct"]
    plain = 8.0 * torch.einsum("nkd,ckd->nc", x_hat, w_hat)
    assert not torch.allclose(plain, logits, atol=1e-3)          # TDE did change the logits


def test_evaluate_cli_uses_tde(causal_run, tmp_path):
    out, summary = causal_run
    assert main([str(out), "--out", str(tmp_path / "tde"), "--no-plot"]) == 0
    result = json.loads((tmp_path / "tde" / "evaluation.json").read_text())
    assert result["results"]["plain"]["correct"] == summary["test"]["correct"]
    assert result["head"] == "fc"


def test_causal_resume_restores_the_moving_average(tmp_path):
    extra = CAUSAL + ["optim.epochs=2"]
    train(load_config(None, TINY + extra + [f"train.out_dir={tmp_path / 'full'}"]))
    train(load_config(None, TINY + extra + [f"train.out_dir={tmp_path / 'cut'}", "train.stop_after=1"]))
    train(load_config(None, TINY + extra + [f"train.out_dir={tmp_path / 'cut'}", "train.resume=true"]))
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert torch.equal(full["fc.feature_average"], cut["fc.feature_average"])
    assert torch.equal(full["fc.weight"], cut["fc.weight"])


def _ddp_average_worker(rank, world, port, result_path):
    import os

    import torch.distributed as dist
    from ddp_support import leave_worker, leave_worker_after_error
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.Sequential(CausalNormClassifier(2, 3)).train()
        updater = FeatureAverageUpdater.for_model(model)
        batches = {0: torch.tensor([[1.0, 0.0], [3.0, 2.0]]), 1: torch.tensor([[0.0, 4.0], [2.0, 2.0]])}
        for lr in (0.1, 0.01):
            model(batches[rank] * (1 + 10 * lr))
            updater.update(lr)
        torch.save(model[0].feature_average, f"{result_path}.{rank}")
    finally:
        leave_worker_after_error()
    leave_worker()


def test_moving_average_under_ddp_uses_the_global_batch(tmp_path):
    # Each rank sees its own half of the batch; the average must be the one of the whole batch on
    # every rank (the survey's DataParallel computed the mean over all 256 images).
    import torch.multiprocessing as mp
    from ddp_support import free_port
    mp.spawn(_ddp_average_worker, args=(2, free_port(), str(tmp_path / "avg")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(f"{tmp_path / 'avg'}.{r}", weights_only=True) for r in (0, 1))
    global_mean = torch.tensor([1.5, 2.0])               # mean of all four rows
    expected = 0.95 * (global_mean * 2.0) + global_mean * 1.1   # lr 0.1 (x2.0 rows, mu 0.9 on 0), lr 0.01
    assert torch.allclose(rank0, expected) and torch.equal(rank0, rank1)
