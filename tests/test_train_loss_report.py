"""Issue 13 §1.7 and §1.8: focal's exponent is its own key with the paper's default; equalization
losses that mark no class as tail warn (with a count_threshold that would), and the trainer prints
the loss it built."""
import pytest

import ltfast
from ltfast.priors import LongTailWarning
from ltfast.train.config import load_config
from ltfast.train.losses import build_loss, describe_loss

FMNIST_LT = [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_focal_uses_gamma_2_not_seqls_drop_probability():
    loss = build_loss(load_config(None, ["loss.name=focal"])["loss"], FMNIST_LT)
    assert isinstance(loss, ltfast.nn.FocalLoss) and loss.gamma == 2.0
    assert "gamma=2" in describe_loss(loss)
    assert build_loss(load_config(None, ["loss.name=focal", "loss.focal_gamma=3"])["loss"], FMNIST_LT).gamma == 3.0


@pytest.mark.parametrize("counts", [FMNIST_LT, CIFAR10_LT_100, [100] * 20], ids=["fmnist_lt", "cifar10_lt", "20_even"])
@pytest.mark.parametrize("module", ["SoftmaxEqualizationLoss", "EqualizationLoss"])
def test_equalization_losses_warn_when_no_class_is_tail(counts, module):
    with pytest.warns(LongTailWarning, match=r"marks no class as tail .*count_threshold=\d+"):
        loss = getattr(ltfast.nn, module)(counts)
    assert int(loss.tail_mask.sum()) == 0


def test_suggested_threshold_gives_a_tail():
    with pytest.warns(LongTailWarning, match=r"count_threshold=40 gives .*3 of 10 classes"):
        ltfast.nn.SoftmaxEqualizationLoss(FMNIST_LT)
    loss = ltfast.nn.SoftmaxEqualizationLoss(FMNIST_LT, count_threshold=40)
    assert loss.tail_mask.tolist() == [False] * 7 + [True] * 3


def test_trainer_prints_the_loss_it_built(capsys, tmp_path):
    from test_train import TINY
    from ltfast.train import train
    with pytest.warns(LongTailWarning):
        train(load_config(None, TINY + [f"train.out_dir={tmp_path}", "loss.name=seql", "optim.epochs=1",
                                        "optim.warmup_epochs=0", "train.save_checkpoints=false",
                                        "train.plot=false"]))
    out = capsys.readouterr().out
    assert "loss: SoftmaxEqualizationLoss(gamma=0.9, tail classes 0 of 7: [] (none: this is plain cross-entropy))" in out


def test_ldam_scale_logits_reaches_the_module():
    from ltfast.train.config import load_config
    from ltfast.train.losses import build_loss
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "fmnist_lt", "ce.yaml"),
                      ["loss.name=ldam_drw", "loss.ldam_scale_logits=true"])
    loss = build_loss(cfg["loss"], [100, 50, 10])
    assert loss.scale_logits and "scale_logits=True" in repr(loss)
