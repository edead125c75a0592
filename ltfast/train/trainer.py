"""The trainer: one code path for a laptop CPU and for torchrun on GPUs.

    summary = train(load_config("configs/fmnist_lt/balanced_softmax.yaml"))

``train`` reads top to bottom: start the run (``engine.start_run``), build the data and the model
(``engine.build_model``), then either a training-free stage (a method's ``fit``) or the epochs:
each one trains (``_train_epoch``), validates, saves and logs; then the test (``_finish``). Every
long-tail method acts through its hooks (``methods/base.py``), called here for the run's enabled
methods; no method is named in this file. DDP is on when torchrun's WORLD_SIZE > 1 (NCCL on GPU,
gloo on CPU); ``data.batch_size`` is the global batch, split evenly over the ranks. Every rank runs
the same code; only rank 0 prints, saves and plots.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import calibration, checkpoint, distributed, engine, methods, metrics
from .config import dump
from .data import build_data
from .engine import RunContext
from .losses import build_loss, describe_loss
from .models import expert_fields, expert_summaries, loss_input
from .optimization import Stepper, build_optimizer, make_scaler, scaled_lr
from .runlog import History, progress_enabled, record_outputs, run_seeds, val_fields
from .schedule import lr_factor


def train(cfg: dict) -> dict:
    """Trains, selects on validation, tests; returns (and on rank 0 writes) the summary dict."""
    tcfg, ocfg, mcfg = cfg["train"], cfg["optim"], cfg["model"]
    engine.check_before_start(cfg)
    if tcfg["seeds"]:
        return run_seeds(cfg, train)  # each seed comes back here with train.seeds=None
    run = engine.start_run(cfg)
    data = build_data(cfg, run.rank, run.world, run.device)
    counts, num_classes = data["class_counts"], len(data["class_counts"])
    if data.get("rule"):  # how a long-tailed subset was drawn (CIFAR-LT, data.imbalance), and its counts
        run.log(f"data: {data['rule']}; training images per class: {', '.join(map(str, counts))}")
    groups = metrics.shot_groups(counts, cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"],
                                 cfg["eval"]["shot_split"])
    active = methods.active(cfg)
    model = engine.build_model(cfg, num_classes, engine.input_channels(data, cfg["data"]), "train", active,
                               log=run.log)
    head_name = engine.head_name_of(model, cfg, num_classes)
    for method in active:
        method.start(model, head_name, run)
    run.to_model(model)

    fit_start = time.perf_counter()
    fitted = next((result for method in active if (result := method.fit(model, data, run)) is not None), None)
    if fitted is not None:  # a classifier from statistics (NCM, tau-norm): no epochs
        fitted["time_s"] = time.perf_counter() - fit_start
        state = _training_free_stage(cfg, run, model, data, groups, fitted)
        return _finish(cfg, run, model, data, groups, state)

    criterion = build_loss(cfg["loss"], counts).to(run.device)
    run.log(f"loss: {describe_loss(criterion)}")
    params = [p for p in model.parameters() if p.requires_grad]
    for method in active:
        params = method.param_groups(model, head_name, params)
    base_lr, lr_note = scaled_lr(cfg)
    optimizer = build_optimizer(params, ocfg, base_lr)
    scaler = make_scaler(tcfg["amp"], run.device)
    net = engine.wrap_for_training(model, cfg, run)
    # Training randomness beyond the data (SEQL's drop seeds) differs per rank.
    torch.manual_seed(tcfg["seed"] * 1000 + run.rank)

    state = {"epoch": 0, "best_top1": -1.0, "best_epoch": None, "history": [], "train_time_s": 0.0,
             "train_images": 0}
    resume = checkpoint.resume_path(cfg)
    if resume:
        state = _resume(resume, cfg, run, model, optimizer, criterion, scaler)
    _write_config(cfg, run, files=["best.pt", "last.pt"] if tcfg["save_checkpoints"] else [])

    loader = data["train_loader"]
    extra_loaders = _extra_loaders(active, data, run, len(loader))
    stepper = Stepper(optimizer, ocfg["accumulate"], len(loader), scaler, net)
    parts = _TrainingParts(cfg, run, model, net, criterion, loader, stepper, base_lr, active, head_name, extra_loaders)
    history = History(cfg, run.rank, state["history"])
    if lr_note:
        run.log(lr_note)
    epochs, out_dir = ocfg["epochs"], tcfg["out_dir"]
    run.log(f"{cfg.get('name') or cfg['loss']['name']}: {mcfg['arch']}, {len(data['train'])} training images, "
            f"{num_classes} classes, {run.world} rank(s) on {run.device.type}, {stepper.steps_per_epoch} steps/epoch "
            f"of {cfg['data']['batch_size']}, {epochs} epochs{', bf16' if run.use_bf16 else ''}")
    epochs_this_run, best_weights = 0, None
    while state["epoch"] < epochs:
        epoch = state["epoch"]
        record = _train_epoch(parts, epoch)
        state["train_time_s"] += record["time_s"]
        state["train_images"] += record["images"]
        del record["images"]

        distributed.broadcast_buffers(model)
        best_now = False
        if data["val_loader"] is not None and ((epoch + 1) % cfg["eval"]["every"] == 0 or epoch + 1 == epochs):
            correct, total, experts = run.evaluate(model, data["val_loader"], num_classes)
            val = metrics.summarize(correct, total, groups)
            record.update(val_fields(val))
            if experts is not None:
                record.update(expert_fields(experts, total, groups))
            if val["top1"] > state["best_top1"]:
                state["best_top1"], state["best_epoch"], best_now = val["top1"], epoch + 1, True
        state["history"].append(record)
        state["epoch"] = epoch + 1
        rng = checkpoint.gather_rng_states(run.world)  # every rank takes part in the gather
        if run.rank == 0 and tcfg["save_checkpoints"]:
            if best_now:
                checkpoint.save_best(os.path.join(out_dir, "best.pt"), model, epoch + 1, state["best_top1"])
            checkpoint.save_last(os.path.join(out_dir, "last.pt"), model=model, optimizer=optimizer,
                                 criterion=criterion, scaler=scaler, state=state, rng=rng, world=run.world, cfg=cfg,
                                 steps_per_epoch=stepper.steps_per_epoch)
        if run.rank == 0 and best_now and not tcfg["save_checkpoints"]:
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        val_text = f"  val {record['val_top1']:.2f} (best {state['best_top1']:.2f} @{state['best_epoch']})" \
            if "val_top1" in record else ""
        run.log(f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  lr {record['lr']:.4g}{val_text}  "
                f"{record['images_per_s']:.0f} img/s  {record['time_s']:.1f}s")
        history.append(record)  # after the checkpoint: the file never runs ahead of last.pt
        epochs_this_run += 1
        if tcfg["stop_after"] is not None and epochs_this_run >= tcfg["stop_after"] and state["epoch"] < epochs:
            run.log(f"stopping after {epochs_this_run} epoch(s) (train.stop_after); resume with train.resume=true")
            history.close()
            distributed.barrier()
            return {"status": "stopped", "epoch": state["epoch"], "out_dir": out_dir}

    history.close()
    return _finish(cfg, run, model, data, groups, state, best_weights)


@dataclass
class _TrainingParts:
    """What every epoch of a training run uses (made once in ``train``)."""
    cfg: dict
    run: RunContext
    model: torch.nn.Module
    net: torch.nn.Module          # the model as the training forward runs it (DDP, compiled)
    criterion: torch.nn.Module
    loader: object
    stepper: Stepper
    base_lr: float
    active: list                  # the run's enabled methods
    head_name: str
    extra_loaders: dict           # name -> a further training stream in step with ``loader`` (methods' extra_loaders)


def _extra_loaders(active: list, data: dict, run: RunContext, batches: int) -> dict:
    """Every enabled method's extra training loaders, each checked to yield ``batches`` batches an epoch
    (the training loader's count: batch i of each reaches the step together)."""
    loaders: dict = {}
    for method in active:
        for name, extra in method.extra_loaders(data, run).items():
            if name in loaders:
                raise ValueError(f"extra loader {name!r}: made by two methods ({method.name} and another)")
            if len(extra) != batches:
                raise ValueError(f"extra loader {name!r} of {method.name}: {len(extra)} batches per epoch, the training "
                                 f"loader has {batches}; they are read in step")
            loaders[name] = extra
    return loaders


def _train_epoch(parts: _TrainingParts, epoch: int) -> dict:
    """One epoch of training batches; returns its history record (plus "images" seen)."""
    cfg, run, model, net, criterion, loader, stepper, base_lr, active, head_name = (
        parts.cfg, parts.run, parts.model, parts.net, parts.criterion, parts.loader, parts.stepper, parts.base_lr,
        parts.active, parts.head_name)
    ocfg, tcfg = cfg["optim"], cfg["train"]
    loader.set_epoch(epoch)
    for extra_loader in parts.extra_loaders.values():
        extra_loader.set_epoch(epoch)
    if hasattr(criterion, "set_epoch"):
        criterion.set_epoch(epoch)  # a loss with a schedule of its own (LDAM's deferred re-weighting)
    model.train()
    for method in active:
        method.on_epoch_start(model, head_name, epoch)
    optimizer, steps_per_epoch, batches = stepper.optimizer, stepper.steps_per_epoch, len(loader)
    images_per_batch = cfg["data"]["batch_size"] // run.world * run.world
    loss_sum = torch.zeros((), device=run.device)
    bar = None
    if run.rank == 0 and tcfg["progress"] and progress_enabled():
        from tqdm import tqdm
        bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{ocfg['epochs']}", leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    step = epoch * steps_per_epoch
    extra_names = list(parts.extra_loaders)
    for i, ((images, labels), *extra_batches) in enumerate(zip(loader, *parts.extra_loaders.values())):
        lr = base_lr * lr_factor(step + stepper.step_of(i), steps_per_epoch, ocfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        extra = {name: (x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True))
                 for name, (x, y) in zip(extra_names, extra_batches)}
        mixed = next((m for m in (method.mix_batch(images, labels, criterion) for method in active) if m is not None),
                     None)
        images, loss_of = mixed if mixed is not None else (images, None)
        with stepper.context(i):
            with run.autocast():
                # a method that owns the step (BBN's two branches) gives the loss; else the default forward
                loss = next((owned for method in active
                             if (owned := method.train_step(net, images, labels, extra, criterion)) is not None), None)
                if loss is None:
                    outputs = loss_input(net(images.contiguous(memory_format=run.memory_format)), criterion)
                    loss = criterion(outputs, labels) if loss_of is None else loss_of(outputs)
            stepper.backward(loss, i)  # zero_grad / backward / step, accumulated and fp16-scaled
        for method in active:
            method.after_step(lr)
        loss_sum += loss.detach().float()
        if bar is not None:
            bar.update(1)
            if (i + 1) % tcfg["log_every"] == 0:  # .item() syncs: only now and then
                rate = (i + 1) * images_per_batch / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
    if not math.isfinite(loss_sum.item()):
        raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    return {"epoch": epoch + 1, "loss": loss_sum.item() / batches, "lr": lr, "time_s": elapsed,
            "images_per_s": batches * images_per_batch / elapsed, "images": batches * images_per_batch}


def _resume(path: str, cfg: dict, run: RunContext, model, optimizer, criterion, scaler) -> dict:
    """Restores a run from its last.pt (checked against the config); returns the trainer state."""
    ckpt = checkpoint.read_resume(path, cfg)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    criterion.load_state_dict(ckpt["criterion"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = ckpt["state"]
    if len(ckpt["rng"]) == run.world:
        checkpoint.set_rng_state(ckpt["rng"][run.rank])
    else:
        run.log(f"resume: checkpoint from {len(ckpt['rng'])} ranks, running {run.world}: RNG streams reseeded")
        torch.manual_seed(cfg["train"]["seed"] * 1000 + run.rank + 7919 * state["epoch"])
    run.log(f"resumed from {path} after epoch {state['epoch']}")
    return state


def _write_config(cfg: dict, run: RunContext, files: list) -> None:
    """config.yaml on rank 0, listed with ``files`` before they are written (runlog's manifest:
    what train.overwrite may delete)."""
    if run.rank == 0:
        out_dir = cfg["train"]["out_dir"]
        record_outputs(out_dir, files=["config.yaml"] + files)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(dump(cfg))


def _training_free_stage(cfg: dict, run: RunContext, model, data: dict, groups: dict, fitted: dict) -> dict:
    """After a method's ``fit``: the validation split once (reported as the run's validation score),
    best.pt and history.jsonl like a trained run; returns the trainer state for ``_finish``."""
    num_classes, info = len(data["class_counts"]), fitted["info"]
    record = {"epoch": 0, "fit_time_s": fitted["time_s"]}
    best_top1 = -1.0
    if data["val_loader"] is not None:
        correct, total, _ = run.evaluate(model, data["val_loader"], num_classes)
        val = metrics.summarize(correct, total, groups)
        record.update(val_fields(val))
        best_top1 = val["top1"]
        info["val_top1"] = best_top1
    run.log(f"{fitted['label']}: {fitted['selection']}" + (f"; validation top-1 {best_top1:.2f}" if best_top1 >= 0
                                                            else ""))
    save = cfg["train"]["save_checkpoints"]
    _write_config(cfg, run, files=["best.pt"] if save else [])
    if run.rank == 0 and save:
        checkpoint.save_best(os.path.join(cfg["train"]["out_dir"], "best.pt"), model, 0, best_top1, decoupled=info)
    history = History(cfg, run.rank, [])
    history.append(record)
    history.close()
    return {"epoch": 0, "best_top1": best_top1, "best_epoch": None, "history": [record],
            "train_time_s": fitted["time_s"], "train_images": 0, "selection": fitted["selection"], "decoupled": info}


def _finish(cfg: dict, run: RunContext, model, data: dict, groups: dict, state: dict,
            best_weights: Optional[dict] = None) -> dict:
    """Test with the best-validation weights (last epoch's when there is no validation split)."""
    out_dir, num_classes = cfg["train"]["out_dir"], len(data["class_counts"])
    selection = state.get("selection", "last epoch (no validation split)")  # a training-free stage names its own
    if data["val_loader"] is not None and state["best_epoch"] is not None:
        selection = f"best validation top-1, epoch {state['best_epoch']}"
        if cfg["train"]["save_checkpoints"]:
            distributed.barrier()  # rank 0 has finished writing best.pt
            checkpoint.load_model_weights(model, os.path.join(out_dir, "best.pt"), "best.pt")
        else:
            model.load_state_dict(distributed.broadcast_object(best_weights, run.world))
    eval_start = time.perf_counter()
    try:
        result = run.evaluate_split(model, data["test_loader"], num_classes, calibrate=True)
    except Exception as error:
        _write_failed_summary(cfg, state, selection, error, run.rank)
        raise
    correct, total, experts = result.correct, result.total, result.expert_correct
    test = metrics.summarize(correct, total, groups, cfg["eval"]["ua"])
    test["correct"], test["total"] = correct.tolist(), total.tolist()  # to re-aggregate or compare runs
    # ECE, per-class precision / recall / F1, macro-F1, geometric-mean recall, by many / medium / few
    # (calibration.summarize_classification): new keys only, the accuracies above stay as they were.
    test.update(calibration.summarize_classification(result.classification, groups))
    if experts is not None:  # each expert alone; the top-level numbers are the experts' mean logits
        test["experts"] = [dict(summary, correct=c.tolist()) for summary, c in
                           zip(expert_summaries(experts, total, groups), experts)]
    eval_time = time.perf_counter() - eval_start
    device = run.device
    summary = {
        "name": cfg.get("name") or cfg["loss"]["name"], "status": "finished",
        "selection": selection, "best_epoch": state["best_epoch"], "best_val_top1": state["best_top1"]
        if state["best_epoch"] is not None else None,
        "test": test, "reported": cfg["eval"]["reported"],
        "class_counts": data["class_counts"], "class_names": data["class_names"],
        "shots": {name: [int(c) for c in groups[name].nonzero().flatten()] for name in metrics.SHOTS},
        "world_size": run.world, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bf16": run.use_bf16, "torch_threads": torch.get_num_threads(),
        "train_time_s": state["train_time_s"], "test_time_s": eval_time,
        "train_images_per_s": state["train_images"] / max(state["train_time_s"], 1e-9),
        "history": state["history"], "config": cfg,
    }
    if "decoupled" in state:
        summary["decoupled"] = state["decoupled"]  # tau-norm's tau and validation curve, NCM's settings
    if run.rank == 0:
        _write_summary(cfg, summary, data, groups, result.classification)
    distributed.barrier()  # ranks leave together: none tears its connections down while rank 0 still writes
    return summary


def _write_summary(cfg: dict, summary: dict, data: dict, groups: dict,
                   classification: calibration.ClassificationCounts) -> None:
    """summary.json (and per_class.png, reliability.png), and the lines that report the test."""
    out_dir, test, selection = cfg["train"]["out_dir"], summary["test"], summary["selection"]
    record_outputs(out_dir, files=["summary.json"] + (["per_class.png", "reliability.png"] if cfg["train"]["plot"]
                                                      else []))
    if cfg["train"]["plot"]:
        title = (f"{summary['name']}: test top-1 {test['top1']:.1f}, many {_fmt(test['many'])}, "
                 f"medium {_fmt(test['medium'])}, few {_fmt(test['few'])}")
        summary["plot"] = metrics.plot_per_class(test["per_class"], data["class_counts"], groups,
                                                 os.path.join(out_dir, "per_class.png"), title, data["class_names"])
        # Lines by PREDICTED group: a head-class prediction more confident than it is accurate is the
        # long-tail over-confidence the diagram is for.
        summary["reliability_plot"] = calibration.reliability_diagram(
            classification, os.path.join(out_dir, "reliability.png"), f"{summary['name']}: test reliability",
            groups, by="predicted")
    summary_path = os.path.join(out_dir, "summary.json")
    summary["summary"] = summary_path
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    ra = f"  RA {test['ra']:.1f}" if test.get("ra") is not None else ""
    print(f"test ({selection}): top-1 {test['top1']:.2f}  many {_fmt(test['many'])}  "
          f"medium {_fmt(test['medium'])}  few {_fmt(test['few'])}{ra}  -> {summary_path}", flush=True)
    print(f"  calibration: ECE {_fmt(test['ece'])}  macro-F1 {_fmt(test['macro_f1'])}  "
          f"geometric-mean recall {_fmt(test['gmean_recall'])}", flush=True)
    if "experts" in test:
        print("  each expert alone: " + ", ".join(f"expert {k} top-1 {_fmt(e['top1'])} (few {_fmt(e['few'])})"
                                                  for k, e in enumerate(test["experts"], start=1)), flush=True)


def _write_failed_summary(cfg, state, selection, error, rank) -> None:
    """A test-time failure (an image gone since start-up) still leaves what was measured: the
    training history, the selected epoch and the error, in summary.json with status 'test_failed'."""
    if rank != 0:
        return
    path = os.path.join(cfg["train"]["out_dir"], "summary.json")
    record_outputs(cfg["train"]["out_dir"], files=["summary.json"])
    summary = {"name": cfg.get("name") or cfg["loss"]["name"], "status": "test_failed",
               "error": f"{type(error).__name__}: {error}", "selection": selection,
               "best_epoch": state["best_epoch"],
               "best_val_top1": state["best_top1"] if state["best_epoch"] is not None else None,
               "train_time_s": state["train_time_s"], "history": state["history"], "config": cfg}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"test failed ({type(error).__name__}); training history written to {path}", flush=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
