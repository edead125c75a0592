"""Findings of the ltfast trial (issue 19 §4), one test (or a parametrized set) per finding: each
failed before its fix."""
import json
import os

import pytest

from ltfast.train import load_config, runlog, train
from ltfast.train.config import ConfigError

from test_train import TINY

ONE = ["optim.epochs=1", "optim.warmup_epochs=0", "train.plot=false", "train.tensorboard=false"]


def tiny(out, *extra):
    return load_config(None, TINY + [f"train.out_dir={out}"] + list(extra))


# ------------------------------------------------------------- 1: overwrite deletes only its own files

@pytest.mark.parametrize("foreign", ["README.md", "src/main.py", "eval/mine.txt"])
def test_overwrite_refuses_and_keeps_foreign_entries(tmp_path, foreign):
    out = tmp_path / "run"
    train(tiny(out, *ONE))
    path = out / foreign
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's work")
    with pytest.raises(ConfigError, match=rf"train.overwrite: {out} holds files .*{foreign.split('/')[0]}"):
        train(tiny(out, *ONE, "train.overwrite=true"))
    assert path.read_text() == "the user's work"
    assert (out / "summary.json").exists()          # nothing at all deleted


@pytest.mark.parametrize("marker", ["config.yaml", "summary.json", "history.jsonl"])
def test_overwrite_refuses_a_folder_without_manifest(tmp_path, marker):
    # the trial's data loss: any of these names made a user's folder "a run" that overwrite emptied
    (tmp_path / marker).write_text("x")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.py").write_text("code")
    (tmp_path / "README.md").write_text("notes")
    with pytest.raises(ConfigError, match=rf"train.overwrite: {tmp_path} has no .ltfast-run.json"):
        train(tiny(tmp_path, *ONE, "train.overwrite=true"))
    assert (tmp_path / "src" / "model.py").read_text() == "code" and (tmp_path / "README.md").exists()


def test_overwrite_of_a_genuine_run_deletes_exactly_its_files(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, *ONE, "train.plot=true"))
    manifest = runlog.read_manifest(str(out))
    assert {"config.yaml", "best.pt", "last.pt", "history.jsonl", "summary.json", "per_class.png"} <= \
        set(manifest["files"])
    (out / "last.pt.abc123.tmp").write_bytes(b"")   # what a killed checkpoint write leaves
    train(tiny(out, *ONE, "train.overwrite=true", "train.save_checkpoints=false"))
    assert sorted(p.name for p in out.iterdir()) == [runlog.MANIFEST, "config.yaml", "history.jsonl",
                                                      "summary.json"]


def test_overwrite_of_a_seed_sweep_and_of_evaluation_outputs(tmp_path):
    from ltfast.train.evaluation import main as evaluate_main
    out = tmp_path / "sweep"
    train(tiny(out, *ONE, "train.seeds=[0, 1]"))
    assert evaluate_main([str(out / "seed0"), "--no-plot"]) == 0   # eval/test/ is listed in seed0's manifest
    assert (out / "seed0" / "eval" / "test" / "evaluation.json").exists()
    assert runlog.foreign_entries(str(out)) == []
    (out / "seed1" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="seed1/notes.txt"):
        train(tiny(out, *ONE, "train.seeds=[0, 1]", "train.overwrite=true"))
    os.remove(out / "seed1" / "notes.txt")
    train(tiny(out, *ONE, "train.seeds=[0]", "train.overwrite=true"))
    assert sorted(p.name for p in out.iterdir()) == [runlog.MANIFEST, "config.yaml", "seed0", "seeds_summary.json"]
    assert not (out / "seed0" / "eval").exists()


def test_resume_of_an_older_run_writes_its_manifest(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "optim.epochs=2", "train.stop_after=1", "train.plot=false", "train.tensorboard=false"))
    os.remove(out / runlog.MANIFEST)                 # as an ltfast before the manifest left it
    train(tiny(out, "optim.epochs=2", "train.resume=true", "train.plot=false", "train.tensorboard=false"))
    assert runlog.foreign_entries(str(out)) == []


# ------------------------------------------------------------- ops: devices, mix_weight, temperatures

import torch  # noqa: E402

import ltfast  # noqa: E402
from ltfast import soft_targets  # noqa: E402

needs_extension = pytest.mark.skipif(not ltfast._extension.AVAILABLE, reason="needs the compiled extension")
N, C = 6, 5


def _inputs(experts=None):
    gen = torch.Generator().manual_seed(0)
    shape = (N, C) if experts is None else (N, experts, C)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    target = torch.randint(0, C, (N,), generator=gen)
    return logits, target


def _op_calls():
    """op -> (logits, function(logits, **arguments), the arguments of a valid call)."""
    z, y = _inputs()
    z3, _ = _inputs(experts=3)
    vec, ones = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    mask = torch.tensor([False, False, True, True, True])
    probs = torch.full((N, C), 1.0 / C, dtype=torch.float64)
    smoothing = torch.full((C,), 0.1, dtype=torch.float64)
    return {
        "mixed_cross_entropy": (z, soft_targets.mixed_cross_entropy, dict(
            target=y, target_b=(y + 1) % C, mix_weight=torch.tensor(0.3, dtype=torch.float64), adjustment=vec,
            weight=ones, label_smoothing=smoothing)),
        # LDAM's margin is refused with target_b: the per-class smoothing case carries it
        "mixed_cross_entropy_margin": (z, soft_targets.mixed_cross_entropy, dict(
            target=y, target_margin=vec, label_smoothing=smoothing)),
        "adjusted_cross_entropy": (z, ltfast.adjusted_cross_entropy, dict(
            target=y, adjustment=vec, target_margin=vec, weight=ones)),
        "balanced_softmax_loss": (z, ltfast.balanced_softmax_loss, dict(target=y, log_prior=vec)),
        "probability_cross_entropy": (z, soft_targets.probability_cross_entropy, dict(
            target=probs, adjustment=vec, weight=ones)),
        "lade_loss": (z, ltfast.lade_loss, dict(target=y, log_prior=vec)),
        "lade_regularizer": (z, ltfast.lade_regularizer, dict(target=y, log_prior=vec)),
        "softmax_equalization_loss": (z, ltfast.softmax_equalization_loss, dict(
            target=y, tail_mask=mask, seed=torch.tensor([1, 2]))),
        "equalization_loss": (z, ltfast.equalization_loss, dict(target=y, tail_mask=mask)),
        "diverse_expert_loss": (z3, ltfast.diverse_expert_loss, dict(
            target=y, adjustments=torch.zeros(3, C, dtype=torch.float64))),
        "ride_loss": (z3, ltfast.ride_loss, dict(target=y, target_margin=vec, weight=ones, temperature=ones)),
    }


def _cases():
    return [(op, arg) for op, (_, _, args) in _op_calls().items() for arg in args
            if isinstance(args[arg], torch.Tensor)]


@needs_extension
@pytest.mark.parametrize("op,arg", _cases())
def test_every_tensor_argument_on_another_device_is_refused(op, arg):
    # finding 3: a meta target_b / mix_weight next to CPU logits returned uninitialised memory
    logits, function, args = _op_calls()[op]
    assert torch.isfinite(function(logits, **args)).all()     # the unchanged call works
    with pytest.raises(RuntimeError, match=rf"{arg} must be on the same device as logits \(cpu\), got meta"):
        function(logits, **dict(args, **{arg: args[arg].to("meta")}))


@needs_extension
@pytest.mark.parametrize("bad,error", [(1.5, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                                       (True, TypeError), ("0.5", TypeError),
                                       (torch.tensor(1.5, dtype=torch.float64), ValueError),
                                       (torch.tensor([0.5, -0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64), ValueError),
                                       (torch.tensor(1), TypeError)])
@pytest.mark.parametrize("entry", ["functional", "module"])
def test_mix_weight_must_be_a_probability(bad, error, entry):
    logits, target = _inputs()
    call = (lambda lam: soft_targets.mixed_cross_entropy(logits, target, target, lam)) if entry == "functional" \
        else (lambda lam: ltfast.nn.CrossEntropyLoss()(logits, target, target_b=target, mix_weight=lam))
    call(0.5)
    with pytest.raises(error, match="mix_weight"):
        call(bad)


@needs_extension
@pytest.mark.parametrize("temperature,base", [(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]), 1.0),
                                              (torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]), 1.0),
                                              (None, 0.0), (None, -1.0), (None, float("inf"))])
def test_ride_loss_temperature_must_be_positive(temperature, base):
    logits, target = _inputs(experts=3)
    with pytest.raises(ValueError, match="temperature"):
        ltfast.ride_loss(logits.float(), target, temperature=temperature, base_temperature=base)


# ------------------------------------------------------------- 4: compiled mixup, a new lambda per batch

@needs_extension
@pytest.mark.parametrize("entry", ["module", "functional", "balanced_softmax"])
def test_compiled_mixup_does_not_recompile_for_new_float_lambdas(entry):
    import random
    import torch._dynamo.testing
    torch._dynamo.reset()
    log_prior = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    criterion = ltfast.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(logits, a, b, lam):
        if entry == "module":
            return criterion(logits, a, target_b=b, mix_weight=lam)
        if entry == "functional":
            return ltfast.adjusted_cross_entropy(logits, a, target_b=b, mix_weight=lam)
        return ltfast.balanced_softmax_loss(logits, a, log_prior, target_b=b, mix_weight=lam)

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(1)
    frames = []
    for _ in range(10):
        lam = rng.betavariate(0.2, 0.2)
        logits = torch.randn(N, C, generator=gen, requires_grad=True)
        a, b = torch.randint(0, C, (N,), generator=gen), torch.randint(0, C, (N,), generator=gen)
        loss = compiled(logits, a, b, lam)
        (grad,) = torch.autograd.grad(loss, logits)
        eager_logits = logits.detach().clone().requires_grad_(True)
        eager = step(eager_logits, a, b, lam)
        (eager_grad,) = torch.autograd.grad(eager, eager_logits)
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-7)
        frames.append(counter.frame_count)
    # Dynamo compiles a Python float input as a constant first and, on the second value, once more
    # with the float dynamic (automatic dynamic; plain `lam * x` does the same): at most 2 compiles,
    # then none for any further lambda. Before the fix every lambda recompiled (FailOnRecompileLimitHit).
    assert frames[1] <= 2 and frames[-1] == frames[1], frames


# ------------------------------------------------------------- 7: RIDELoss without diversity

@needs_extension
@pytest.mark.parametrize("drw", [False, True])
def test_ride_loss_without_diversity_matches_the_original(drw):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import _survey_originals as orig
    from ltfast.compat import ensemble
    counts = [60, 30, 15, 8, 4]
    ours = ltfast.nn.RIDELoss(counts, drw_epoch=2 if drw else None, diversity_factor=0.0)
    transcription = ensemble.RIDELoss(cls_num_list=counts, reweight_epoch=2, additional_diversity_factor=0.0)
    original = orig.OriginalRIDELoss(cls_num_list=counts, reweight_epoch=2, additional_diversity_factor=0.0)
    ours.set_epoch(2 if drw else 0)                     # 0-based epoch 2 = the original's 1-based epoch 3 > 2
    transcription._hook_before_epoch(3 if drw else 1)
    original._hook_before_epoch(3 if drw else 1)
    logits, target = _inputs(experts=3)
    results = []
    for name, fn in (("ours", lambda x: ours(x, target)),
                     ("compat", lambda x: transcription(x.mean(1), target, {"logits": x.transpose(0, 1)})),
                     ("original", lambda x: original(x.mean(1), target, {"logits": x.transpose(0, 1)}))):
        x = logits.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[:2]:
        # float64 CB weights here, the original's float32 ones: 1e-7 relative
        torch.testing.assert_close(loss, results[2][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, results[2][1], rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------- 8: CrossEntropyLoss shapes as nn.CrossEntropyLoss

SHAPES = {"unbatched": (C,), "batched": (N, C), "2d": (3, C, 4, 2), "1d": (2, C, 3)}


def _ce_inputs(shape, probability, gen):
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if probability:
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=0 if len(shape) == 1 else 1)
    else:
        target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
        target = torch.randint(0, C, target_shape, generator=gen)
        if target.dim() > 0:
            target.view(-1)[0] = -100        # an ignored element
    return logits, target


@needs_extension
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("probability", [False, True], ids=["index", "probability"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weight": True}, {"label_smoothing": 0.2}, {"weight": True, "label_smoothing": 0.1}],
                         ids=["plain", "weight", "smoothing", "both"])
def test_cross_entropy_loss_takes_torch_shapes(shape, probability, reduction, options):
    gen = torch.Generator().manual_seed(3)
    logits, target = _ce_inputs(SHAPES[shape], probability, gen)
    kwargs = dict(reduction=reduction, label_smoothing=options.get("label_smoothing", 0.0))
    if options.get("weight"):
        kwargs["weight"] = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    ours_x, ref_x = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = ltfast.nn.CrossEntropyLoss(**kwargs)(ours_x, target)
    ref = torch.nn.CrossEntropyLoss(**kwargs)(ref_x, target)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64)
    ours.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)


@needs_extension
def test_cross_entropy_loss_mixup_on_spatial_inputs():
    gen = torch.Generator().manual_seed(4)
    logits, a = _ce_inputs((2, C, 3, 2), False, gen)
    _, b = _ce_inputs((2, C, 3, 2), False, gen)
    for lam in (0.3, torch.tensor([0.2, 0.9], dtype=torch.float64)):
        per_element = lam if isinstance(lam, float) else lam.view(2, 1, 1)
        for reduction in ("none", "sum"):
            ours = ltfast.nn.CrossEntropyLoss(reduction=reduction)(logits, a, target_b=b, mix_weight=lam)
            f = torch.nn.functional.cross_entropy
            ref = per_element * f(logits, a, reduction="none") + (1 - per_element) * f(logits, b, reduction="none")
            torch.testing.assert_close(ours, ref if reduction == "none" else ref.sum(), rtol=1e-10, atol=1e-12)


@needs_extension
@pytest.mark.parametrize("ignore_index", [0, 3])
def test_ignore_index_with_probability_targets_raises_like_torch(ignore_index):
    gen = torch.Generator().manual_seed(5)
    logits, target = _ce_inputs((N, C), True, gen)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target") as ours:
        ltfast.nn.CrossEntropyLoss(ignore_index=ignore_index)(logits, target)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(logits, target)
    assert str(theirs.value).startswith(str(ours.value))
    ltfast.nn.CrossEntropyLoss(ignore_index=-1)(logits, target)   # a negative one is unused, as in torch


# ------------------------------------------------------------- 9a: the loss line says what runs

@pytest.mark.parametrize("config,expected,absent", [
    ("fmnist_lt/mislas_stage2", ["label_smoothing per class"], ["label_smoothing=0"]),
    ("fmnist_lt/sade", ["tau=2", "expert 1 adjustment", "expert 2 adjustment", "expert 3 adjustment"], []),
    ("fmnist_lt/ride", ["diversity_factor=-0.2", "diversity temperature per class", "target_margin"], []),
])
def test_loss_description_names_what_runs(config, expected, absent):
    from ltfast.train.losses import build_loss, describe_loss
    cfg = load_config(config, ["model.init_from=x.pt"] if "stage2" in config else [])
    text = describe_loss(build_loss(cfg["loss"], [100, 50, 20, 10, 5]))
    for part in expected:
        assert part in text, text
    for part in absent:
        assert part not in text, text


# ------------------------------------------------------------- 9b, 9c: evaluate's post-hoc outputs and tau

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny(out, *ONE))
    return out


def test_posthoc_modes_write_their_own_files(small_run):
    from ltfast.train.evaluation import main as evaluate_main
    assert evaluate_main([str(small_run), "--no-plot", "--logit-adjust", "1"]) == 0
    assert evaluate_main([str(small_run), "--no-plot", "--tau-norm", "1"]) == 0
    assert evaluate_main([str(small_run), "--no-plot"]) == 0
    la = json.loads((small_run / "eval" / "test-logit_adjust_1" / "evaluation.json").read_text())
    tn = json.loads((small_run / "eval" / "test-tau_norm_1" / "evaluation.json").read_text())
    plain = json.loads((small_run / "eval" / "test" / "evaluation.json").read_text())
    assert (la["posthoc"]["logit_adjust"], la["posthoc"]["tau_norm"]) == (1.0, None)
    assert (tn["posthoc"]["logit_adjust"], tn["posthoc"]["tau_norm"]) == (None, 1.0)
    assert "posthoc" not in plain["results"]
    assert runlog.foreign_entries(str(small_run)) == []       # all listed in the run's manifest


@pytest.mark.parametrize("option,value", [("--logit-adjust", "inf"), ("--logit-adjust", "nan"), ("--tau-norm", "1e6"),
                                          ("--tau-norm", "-1"), ("--logit-adjust", "11")])
def test_posthoc_tau_must_be_finite_and_sane(small_run, option, value, capsys):
    from ltfast.train.evaluation import main as evaluate_main
    with pytest.raises(SystemExit) as stop:
        evaluate_main([str(small_run), "--no-plot", option, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: tau must be a finite number in [0, 10]" in err


# ------------------------------------------------------------- 9d: loss keys of other losses

@pytest.mark.parametrize("override,users", [("loss.smooth_head=0.2", "label_aware_smoothing"),
                                            ("loss.sade_tau=3", "sade"), ("loss.diversity_factor=-0.5", "ride"),
                                            ("loss.base_temperature=2", "ride")])
def test_loss_keys_of_other_losses_are_refused(override, users):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: only used by loss.name={users}, but "
                                          rf"loss.name is 'ce'"):
        load_config("fmnist_lt/ce", [override])
    # their defaults stay harmless, and the configs that set them for their own loss load
    load_config("fmnist_lt/ce", [override.split("=")[0] + "=" + str(
        {"smooth_head": 0.3, "sade_tau": 2.0, "diversity_factor": -0.2, "base_temperature": 1.0}[
            override.split("=")[0].split(".")[1]])])
    for config in ("fmnist_lt/sade", "fmnist_lt/ride", "fmnist_lt/mislas_stage2"):
        load_config(config)


# ------------------------------------------------------------- 9e: resume with another config

@pytest.mark.parametrize("changed,key", [("optim.epochs=3", "optim.epochs"), ("optim.lr=0.2", "optim.lr"),
                                         ("loss.name=focal", "loss.name")])
def test_resume_with_a_changed_config_is_refused(tmp_path, changed, key):
    out = tmp_path / "run"
    base = ["optim.epochs=2", "train.stop_after=1", "train.plot=false", "train.tensorboard=false"]
    train(tiny(out, *base))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"train.resume: the config differs from the checkpoint's .* {key} "):
        train(tiny(out, *base, "train.resume=true", changed))
    assert (out / "config.yaml").read_text() == saved
    # harmless keys (logging, threads, where the data lies) may change
    summary = train(tiny(out, "optim.epochs=2", "train.plot=false", "train.tensorboard=false", "train.resume=true",
                         "train.log_every=7", "data.eval_batch_size=8"))
    assert summary["status"] == "finished"


# ------------------------------------------------------------- 9f: one line, not a traceback

def _one_line_error(capsys, prefix):
    # warnings (two lines each: the message, then the indented source line) are not the error
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Warning" not in line
           and not line.startswith(" ")]
    assert len(err) == 1 and prefix in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_init_from_that_does_not_fit_is_one_line(tmp_path, small_run, capsys):
    from ltfast.train.__main__ import main as train_main
    overrides = [f"{o}" for o in TINY] + ONE + [f"train.out_dir={tmp_path / 'x'}", "model.width=16",
                                                f"model.init_from={small_run / 'best.pt'}"]
    assert train_main(overrides) == 2
    assert "model.init_from" in _one_line_error(capsys, "error:")


def test_causal_heads_that_do_not_split_the_feature_is_one_line(tmp_path, capsys):
    from ltfast.train.__main__ import main as train_main
    overrides = list(TINY) + ONE + [f"train.out_dir={tmp_path / 'x'}", "model.classifier=causal", "model.causal_heads=3"]
    assert train_main(overrides) == 2
    assert "model.causal_heads: 3 heads" in _one_line_error(capsys, "error:")


class _Crafted:
    def __reduce__(self):
        return (os.system, ("echo crafted",))


@pytest.mark.parametrize("cli", ["evaluate", "test_time"])
@pytest.mark.parametrize("content", ["crafted", "corrupt", "other_model"])
def test_crafted_or_corrupt_checkpoints_are_one_line(tmp_path, small_run, capsys, cli, content):
    import pickle
    from ltfast.train.evaluation import main as evaluate_main
    from ltfast.train.test_time import main as test_time_main
    path = tmp_path / "best.pt"
    if content == "crafted":
        path.write_bytes(pickle.dumps({"model": _Crafted()}))
    elif content == "corrupt":
        path.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    else:  # a checkpoint of another width than its config says
        torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, path)
    (tmp_path / "config.yaml").write_text((small_run / "config.yaml").read_text())
    main = evaluate_main if cli == "evaluate" else test_time_main
    assert main([str(path), "--no-plot"] if cli == "evaluate" else [str(path)]) == 2
    _one_line_error(capsys, "error:")


# ------------------------------------------------------------- 5: SADE's aggregation guard

def test_implied_test_priors_of_the_sade_experts():
    from ltfast import priors
    from ltfast.train.test_time import implied_test_priors
    counts = [100, 50, 10, 5]
    implied = implied_test_priors(counts, 2.0, 3)
    pi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    inverse = priors.inverse_prior(pi)
    torch.testing.assert_close(implied[0], pi, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(implied[1], torch.full((4,), 0.25, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(implied[2], inverse ** 2 / (inverse ** 2).sum(), rtol=1e-6, atol=1e-9)
    assert implied_test_priors(counts, 2.0, 4) is None


@pytest.mark.parametrize("test_prior,weights,accepted", [
    ([0.25, 0.25, 0.25, 0.25], [0.10, 0.10, 0.80], False),   # uniform test set, collapse to the inverse expert
    ([0.25, 0.25, 0.25, 0.25], [0.25, 0.50, 0.25], True),    # towards the uniform expert
    ([0.55, 0.30, 0.10, 0.05], [0.65, 0.24, 0.11], True),    # forward: towards the long-tailed expert
    ([0.05, 0.10, 0.30, 0.55], [0.10, 0.30, 0.60], True),    # backward: towards the inverse expert
    ([0.55, 0.30, 0.10, 0.05], [0.10, 0.20, 0.70], False),   # forward, but towards the inverse expert
])
def test_prior_consistency_guard(test_prior, weights, accepted):
    from ltfast.train.test_time import GUARD_TOLERANCE, implied_test_priors, prior_consistency
    implied = implied_test_priors([100, 50, 10, 5], 2.0, 3)
    predictions = torch.cat([torch.full((int(1000 * p),), c) for c, p in enumerate(test_prior)])
    logits = torch.nn.functional.one_hot(predictions, 4).double()
    guard = prior_consistency(logits, implied, weights)
    assert (guard["kl_learnt"] <= (1 + GUARD_TOLERANCE) * guard["kl_equal"]) == accepted, guard


def test_aggregation_that_drifts_to_a_biased_expert_keeps_the_plain_mean():
    # expert 3 ignores the image and always favours the rarest class: perfectly stable, so the
    # stability loss moves the weight to it, on a balanced test set (the trial's uniform collapse)
    from torch import nn
    from ltfast.train import metrics
    from ltfast.train.models import ExpertOutput
    from ltfast.train.test_time import aggregate_on
    from test_test_time import _source

    class BiasedStableExpert(nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.constant = nn.Parameter(torch.linspace(-1.0, 1.0, 4))
            self.maps = nn.Parameter(torch.randn(2, 144, 4, generator=generator) * 0.5)

        def forward(self, x):
            flat = x.flatten(1)
            logits = torch.stack([flat @ self.maps[0], flat @ self.maps[1], self.constant.expand(x.shape[0], -1)], 1)
            return ExpertOutput(logits.mean(1), logits, logits)

    sets, dataset, data_cfg = _source()
    counts = [100, 50, 10, 5]
    result = aggregate_on(BiasedStableExpert(), sets, dataset, data_cfg, counts, metrics.shot_groups(counts),
                          device="cpu", batch_size=4, epochs=5, log=lambda m: None)
    assert result["weights"][2] > 1 / 3
    assert result["guard"]["kl_learnt"] > 1.1 * result["guard"]["kl_equal"]
    assert result["selected"] == "plain" and result["selected_result"] == result["before"]
