"""``python -m ltfast.evaluate RUN_DIR_OR_CHECKPOINT``: evaluate a trained model without training.

    python -m ltfast.evaluate runs/fmnist_lt/ce                          # best.pt, the run's config, test split
    python -m ltfast.evaluate runs/fmnist_lt/ce --logit-adjust auto      # tau chosen on the validation split
    python -m ltfast.evaluate runs/imagenet_lt/ce/best.pt --tau-norm auto --split val
    python -m ltfast.evaluate runs/x --list other_test.txt --root /data/x data.eval_batch_size=128

RUN_DIR: its ``best.pt`` (``last.pt`` when there is none) with its ``config.yaml``. A checkpoint
file: the ``config.yaml`` next to it, or ``--config``. ``section.key=value`` overrides apply on top
(e.g. ``data.root=`` when the data moved). Reports top-1 (mean per-class accuracy), micro accuracy,
many / medium / few, UA / RA (``eval.ua``), per-class accuracy, the confusion matrix, ECE (15 bins),
per-class precision / recall / F1, macro-F1 and geometric-mean recall (``ltfast.train.calibration``), for the
plain model and, when asked, after post-hoc logit adjustment and / or tau-normalisation
(``ltfast.train.posthoc``). Writes ``evaluation.json``, ``confusion.png``, ``per_class.png`` and
``reliability.png`` into
``--out`` (default ``RUN_DIR/eval/<split>``, ``RUN_DIR/eval/<split>-logit_adjust_<tau>`` /
``-tau_norm_<tau>`` after post-hoc adjustment, so that each mode keeps its own files). Checkpoints are read with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from ltfast.data import datasets

from . import calibration, metrics, posthoc
from .data import make_loader
from .engine import load_run, resolve_target, run_config
from .errors import CheckpointError, ConfigError
from .methods.decoupled import effective_linear
from .models import find_head, split_output
from .runlog import record_output_path

__all__ = ["build_parser", "collect", "evaluate_run", "main", "plot_confusion", "resolve_target", "run_config"]


# Largest tau accepted: ``auto`` searches 0..2 (posthoc.LA_GRID / NORM_GRID); at tau 10 the prior
# term of logit adjustment is 10 x log(ratio 100) = 46 logits and tau-norm divides by ||W_c||^10,
# past anything the literature uses, while inf / 1e6 give inf or NaN logits ("Infinity" in the JSON).
TAU_MAX = 10.0


def _tau(text: str):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= TAU_MAX:
        raise argparse.ArgumentTypeError(f"tau must be a finite number in [0, {TAU_MAX:g}] or 'auto', got {text!r}")
    return value


def _posthoc_suffix(args) -> str:
    """Output folder suffix naming the post-hoc mode, so that a --logit-adjust and a --tau-norm
    evaluation of one run do not overwrite each other's files: '', '-logit_adjust_auto',
    '-tau_norm_1', '-tau_norm_auto-logit_adjust_0.5'."""
    parts = []
    for name, value in (("tau_norm", args.tau_norm), ("logit_adjust", args.logit_adjust)):
        if value is not None:
            parts.append(f"{name}_{value if value == 'auto' else format(value, 'g')}")
    return "".join("-" + p for p in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ltfast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="run folder (best.pt / last.pt + config.yaml) or a checkpoint file")
    parser.add_argument("overrides", nargs="*", help="section.key=value on top of the run's config")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="split of the run's config")
    parser.add_argument("--list", dest="list_file", help="evaluate this list file ('<path> <label>' lines) instead")
    parser.add_argument("--root", help="image root for --list (default: data.root of the config)")
    parser.add_argument("--config", help="config of the checkpoint (default: config.yaml next to it)")
    parser.add_argument("--logit-adjust", type=_tau, default=None, metavar="TAU|auto",
                        help="subtract TAU·log(prior) from the logits; auto: TAU chosen on the validation split")
    parser.add_argument("--tau-norm", type=_tau, default=None, metavar="TAU|auto",
                        help="classifier rows W_c / ||W_c||^TAU (bias dropped); auto: chosen on validation")
    parser.add_argument("--out", help="output folder (default RUN_DIR/eval/<split>, plus -logit_adjust_<tau> / "
                                      "-tau_norm_<tau> when post-hoc)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG files")
    return parser


@torch.no_grad()
def collect(model, loader, head, device) -> dict:
    """One pass: logits, the head's input features (None if the head is not linear) and labels."""
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float().cpu()))
    logits, expert_logits, labels = [], [], []
    try:
        model.eval()
        for images, batch_labels in loader:
            batch_logits, batch_experts = split_output(model(images.to(device)))
            logits.append(batch_logits.float().cpu())
            if batch_experts is not None:
                expert_logits.append(batch_experts.float().cpu())
            labels.append(batch_labels.long().cpu())
    finally:
        hook.remove()
    features = torch.cat(captured) if captured and captured[0].dim() == 2 and not expert_logits else None
    return {"logits": torch.cat(logits), "labels": torch.cat(labels), "features": features,
            "expert_logits": torch.cat(expert_logits) if expert_logits else None}


def _variant_logits(split: dict, weight, bias, log_prior, tau_norm, tau_la):
    base = split["logits"] if tau_norm is None else posthoc.logits_from_features(split["features"], weight, bias, tau_norm)
    return posthoc.adjust(base, log_prior, tau_la)


def evaluate_run(args) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    loaded = load_run(args.target, args.config, args.overrides, device, "ltfast.evaluate")
    model, cfg, sets, checkpoint, run_dir, config = (loaded.model, loaded.cfg, loaded.sets, loaded.checkpoint,
                                                     loaded.run_dir, loaded.config)
    data_cfg, mcfg = cfg["data"], cfg["model"]
    counts = sets["class_counts"]
    num_classes = len(counts)
    split_name = args.split
    if args.list_file:
        root = args.root if args.root is not None else data_cfg["root"]
        listed = datasets.read_list_file(args.list_file, root)
        if listed.labels.numel() and int(listed.labels.max()) >= num_classes:
            raise ValueError(f"--list {args.list_file}: label {int(listed.labels.max())} is outside the model's "
                             f"{num_classes} classes")
        split_name = "list-" + os.path.splitext(os.path.basename(args.list_file))[0]
        sets = dict(sets, **{split_name: listed, "in_memory": False})
    elif sets.get(split_name) is None:
        raise ConfigError(f"--split {split_name}: the run's config has no {split_name} split")
    auto = "auto" in (args.logit_adjust, args.tau_norm)
    if auto and sets.get("val") is None:
        raise ConfigError("auto: choosing tau needs a validation split (data.val_list, or data.val_per_class > 0)")

    head_name, head = find_head(model, num_classes, mcfg["head"])
    experts = getattr(model, "owns_classifiers", False)  # one classifier per expert
    if experts:
        head_name = "linears"
        if args.tau_norm is not None:
            raise ConfigError(f"--tau-norm: {mcfg['arch']} has one classifier per expert; tau-normalisation of a "
                              f"multi-expert model is not defined here")
    linear = isinstance(head, torch.nn.Linear) and not experts
    if args.tau_norm is not None and not linear:
        why = " (a cosine classifier's rows are unit-norm already)" if type(head).__name__ == "CosineLinear" else ""
        raise ConfigError(f"--tau-norm: the head {head_name} is a {type(head).__name__}, not nn.Linear{why}")
    weight, bias = effective_linear(head)  # LWS: the per-class scale folded into W and b
    log_prior = torch.log(torch.as_tensor(counts, dtype=torch.float64) / sum(counts) + 1e-9).float()

    def run(split):
        loader = make_loader(sets, split, data_cfg, sampler=None, batch_size=data_cfg["eval_batch_size"],
                             device=device, train=False, seed=cfg["train"]["seed"], rank=0, world=1)
        return collect(model, loader, head, device)

    start = time.perf_counter()
    evaluated = run(split_name)
    chosen = {"logit_adjust": args.logit_adjust, "tau_norm": args.tau_norm, "selected_on": None}
    selection = None
    if auto:
        val = evaluated if split_name == "val" else run("val")
        selection = posthoc.choose(val["features"], val["logits"], val["labels"], weight, bias, log_prior,
                                   args.logit_adjust, args.tau_norm)
        chosen.update(logit_adjust=selection["logit_adjust"], tau_norm=selection["tau_norm"], selected_on="val")
        if split_name == "val":
            print("warning: tau chosen on the validation split and reported on it (optimistic)", file=sys.stderr)

    groups = metrics.shot_groups(counts, cfg["eval"]["many_threshold"], cfg["eval"]["few_threshold"],
                                 cfg["eval"]["shot_split"])
    labels = evaluated["labels"]

    tables = {}

    def report(logits, name):
        correct, total = metrics.count_correct(logits, labels, num_classes)
        out = metrics.summarize(correct, total, groups, cfg["eval"]["ua"])
        out["correct"], out["total"] = correct.tolist(), total.tolist()
        out["confusion"] = posthoc.confusion_matrix(logits, labels, num_classes).tolist()
        # ECE, precision / recall / F1, macro-F1, geometric-mean recall (the keys of summary.json's test)
        tables[name] = calibration.ClassificationCounts.zeros(num_classes).update(logits, labels)
        out.update(calibration.summarize_classification(tables[name], groups))
        return out

    results = {"plain": report(evaluated["logits"], "plain")}
    if evaluated["expert_logits"] is not None:  # each expert alone; "plain" is their mean logits
        results["experts"] = [report(evaluated["expert_logits"][:, k], f"expert{k}")
                              for k in range(evaluated["expert_logits"].shape[1])]
    adjusted = chosen["logit_adjust"] not in (None, 0) or chosen["tau_norm"] is not None
    if adjusted:
        results["posthoc"] = report(_variant_logits(evaluated, weight, bias, log_prior, chosen["tau_norm"],
                                                    chosen["logit_adjust"]), "posthoc")
    name = cfg.get("name") or cfg["loss"]["name"]
    out_dir = args.out or os.path.join(run_dir, "eval", split_name + _posthoc_suffix(args))
    summary = {"name": name, "checkpoint": os.path.abspath(checkpoint), "config": config, "split": split_name,
               "list_file": args.list_file, "samples": int(labels.numel()), "num_classes": num_classes,
               "class_counts": counts, "class_names": sets.get("class_names"), "head": head_name,
               "shots": {g: [int(c) for c in groups[g].nonzero().flatten()] for g in metrics.SHOTS},
               "posthoc": {**chosen, "val_score": selection["score"] if selection else None,
                           "val_plain_score": selection["plain_score"] if selection else None,
                           "grid": selection["grid"] if selection else None},
               "results": results, "device": str(device), "time_s": time.perf_counter() - start}
    os.makedirs(out_dir, exist_ok=True)
    for written in ["evaluation.json"] + ([] if args.no_plot else ["confusion.png", "per_class.png",
                                                                   "reliability.png"]):
        record_output_path(os.path.join(out_dir, written))  # inside a run folder: listed in its manifest
    if not args.no_plot:
        final = results.get("posthoc", results["plain"])
        summary["confusion_png"] = plot_confusion(final["confusion"], os.path.join(out_dir, "confusion.png"),
                                                  sets.get("class_names"), f"{name}: {_label(chosen)}")
        summary["per_class_png"] = metrics.plot_per_class(
            final["per_class"], counts, groups, os.path.join(out_dir, "per_class.png"),
            f"{name} ({split_name}, {_label(chosen)}): top-1 {final['top1']:.1f}", sets.get("class_names"))
        summary["reliability_png"] = calibration.reliability_diagram(
            tables["posthoc" if "posthoc" in results else "plain"], os.path.join(out_dir, "reliability.png"),
            f"{name} ({split_name}, {_label(chosen)}): reliability", groups, by="predicted")
    path = os.path.join(out_dir, "evaluation.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    summary["json"] = path
    _print(summary)
    return summary


def _label(chosen: dict) -> str:
    parts = []
    if chosen["tau_norm"] is not None:
        parts.append(f"tau-norm {chosen['tau_norm']:g}")
    if chosen["logit_adjust"] not in (None, 0):
        parts.append(f"logit-adjust tau {chosen['logit_adjust']:g}")
    return ", ".join(parts) or "plain"


def _fmt(value) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def _print(summary: dict) -> None:
    print(f"{summary['name']}: {summary['checkpoint']} on {summary['split']} ({summary['samples']} images, "
          f"{summary['num_classes']} classes)")
    ra = "     RA" if summary["results"]["plain"].get("ra") is not None else ""
    print(f"{'':34s} top-1   many medium    few  micro{ra}")
    rows = [("plain", summary["results"]["plain"])]
    if "posthoc" in summary["results"]:
        rows.append((_label(summary["posthoc"]), summary["results"]["posthoc"]))
    for k, r in enumerate(summary["results"].get("experts", []), start=1):
        rows.append((f"expert {k} alone", r))
    for label, r in rows:
        extra = f" {_fmt(r.get('ra'))}" if ra else ""
        print(f"{label:32s} {_fmt(r['top1'])} {_fmt(r['many'])} {_fmt(r['medium'])} {_fmt(r['few'])} "
              f"{_fmt(r['micro'])}{extra}")
    ph = summary["posthoc"]
    if ph["selected_on"]:
        print(f"chosen on the validation split: {_label(ph)} (val top-1 {ph['val_score']:.2f}, "
              f"plain {ph['val_plain_score']:.2f})")
    print(f"-> {summary['json']}")


def plot_confusion(confusion, path: str, class_names=None, title: str = "") -> str:
    """Row-normalised confusion matrix (true class down, predicted across), counts in the cells
    for up to 20 classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matrix = torch.as_tensor(confusion, dtype=torch.float64)
    rows = matrix / matrix.sum(1, keepdim=True).clamp_min(1)
    num = matrix.shape[0]
    size = max(4.0, min(14.0, 0.45 * num + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num <= 20:
        names = class_names if class_names is not None else [str(c) for c in range(num)]
        ax.set_xticks(range(num), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(num), names, fontsize=7)
        for i in range(num):
            for j in range(num):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        evaluate_run(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as error:
        text = str(error)  # one line, the tool named once
        print(f"ltfast.evaluate: error: {text[len('ltfast.evaluate: '):] if text.startswith('ltfast.evaluate: ') else text}", file=sys.stderr)
        return 2
    return 0
