"""The data of a run: the datasets the ``data`` section names (Fashion-MNIST-LT, CIFAR-10/100-LT and
synthetic sets in memory; list files and image folders of image paths, optionally made long-tailed
by ``data.imbalance``), and the loaders that feed them to the trainer, sharded over the DDP ranks.
In-memory sets go through ``ltfast.data.loaders.DeviceTensorLoader``, image paths through the DALI
pipeline or its PIL baseline (``ltfast.data``)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import ConfigError

# LDAM-DRW's cifar_train.py normalisation (Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
# used for CIFAR-100 too; BBN, LADE and SADE copy it): the default of cifar*_lt when data.mean / data.std
# are null, so a run without them is not normalised with Fashion-MNIST's grey statistics.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _synthetic_split(per_class: list[int], data: dict, seed: int):
    """Random uint8 images with a per-class template, so a model can learn them (tests, benchmarks)."""
    from ltfast.data.datasets import InMemoryDataset
    gen = torch.Generator().manual_seed(seed)
    shape = (data["channels"], data["image_size"], data["image_size"])
    templates = torch.rand((len(per_class),) + shape, generator=torch.Generator().manual_seed(data["split_seed"]))
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(per_class)])
    noise = torch.rand((labels.numel(),) + shape, generator=gen)
    images = ((0.6 * templates[labels] + 0.4 * noise) * 255).to(torch.uint8)
    return InMemoryDataset(images, labels)


def load_datasets(data: dict) -> dict:
    """{"train", "val" (or None), "test", "class_counts", "class_names", "in_memory"} from the config."""
    from ltfast.data import datasets
    if data["dataset"] in ("cifar10_lt", "cifar100_lt"):
        return _cifar_sets(data)
    if data["dataset"] == "image_folder":
        return _image_folder_sets(data)
    if data["dataset"] == "fmnist_lt":
        kwargs = {"root": data["root"]} if data["root"] else {}
        lt = datasets.fashion_mnist_lt(ratio=data["ratio"], n_max=data["n_max"], val_per_class=data["val_per_class"],
                                       seed=data["split_seed"], **kwargs)
        return {"train": lt["train"], "val": lt["val"] if data["val_per_class"] else None, "test": lt["test"],
                "class_counts": [int(c) for c in lt["class_counts"]], "class_names": list(lt["class_names"]),
                "in_memory": True}
    if data["dataset"] == "synthetic":
        num_classes = data["num_classes"] or 10
        counts = datasets.long_tailed_counts(data["n_max"], num_classes, data["ratio"])
        seed = data["split_seed"]
        val = (_synthetic_split([data["val_per_class"]] * num_classes, data, seed + 1)
               if data["val_per_class"] else None)
        return {"train": _synthetic_split(counts, data, seed), "val": val,
                "test": _synthetic_split([data["test_per_class"]] * num_classes, data, seed + 2),
                "class_counts": list(counts), "class_names": None, "in_memory": True}
    train = datasets.read_list_file(data["train_list"], data["root"])
    val = datasets.read_list_file(data["val_list"], data["root"]) if data["val_list"] else None
    test = datasets.read_list_file(data["test_list"], data["root"])
    num_classes = _check_list_splits(data, {"train": train, "val": val, "test": test})
    sets = {"train": train, "val": val, "test": test, "class_names": None, "in_memory": False}
    if data["imbalance"] is not None:
        sets["train"] = _long_tailed(train, data, num_classes, f"data.train_list {data['train_list']}")
        sets["rule"] = (f"{data['train_list']} subsampled: {data['profile']} profile, imbalance "
                        f"{data['imbalance']:g}, split seed {data['split_seed']}, {len(sets['train'])} of {len(train)} "
                        f"images")
    sets["class_counts"] = [int(c) for c in datasets.class_counts(sets["train"].labels, num_classes)]
    return sets


def _long_tailed(train, data: dict, num_classes: int, what: str):
    """``data.imbalance`` / ``data.profile`` / ``data.split_seed`` applied to a training split of image
    paths (``ltfast.data.folders.long_tailed_subset``, n_max the largest the classes can supply)."""
    from ltfast.data.folders import long_tailed_subset
    try:
        subset, _ = long_tailed_subset(train, data["imbalance"], data["profile"], data["split_seed"],
                                       num_classes=num_classes)
    except ValueError as error:
        raise ConfigError(f"data.imbalance: {what}: {error}") from None
    return subset


def _cifar_sets(data: dict) -> dict:
    """CIFAR-10-LT / CIFAR-100-LT (``ltfast.data.cifar.cifar_lt``): LDAM-DRW's counts and picks; the
    validation split is the test set, as in LDAM-DRW / BBN / LADE / SADE (there is no other)."""
    from ltfast.data.cifar import cifar_lt
    dataset = data["dataset"].removesuffix("_lt")
    try:
        lt = cifar_lt(data["root"], dataset, data["imbalance"], data["profile"], data["split_seed"])
    except FileNotFoundError as error:
        raise ConfigError(f"data.root: {error}") from None
    except ValueError as error:
        raise ConfigError(f"data.imbalance / data.profile: {error}") from None
    return {"train": lt["train"], "val": lt["val"], "test": lt["test"],
            "class_counts": [int(c) for c in lt["class_counts"]], "class_names": list(lt["class_names"]),
            "in_memory": True, "rule": lt["rule"], "mean": CIFAR_MEAN, "std": CIFAR_STD}


def image_folder_roots(root: str) -> dict:
    """{"train", "val", "test"} folders of an image_folder dataset: ``root/train`` and ``root/test``,
    ``root/val`` when present; with no ``test/`` the ``val/`` folder is the test set (and validation
    is on it, said in the run's log line ``rule``)."""
    folders = {name: os.path.join(root, name) for name in ("train", "val", "test")}
    present = {name: os.path.isdir(path) for name, path in folders.items()}
    if not present["train"] or not (present["test"] or present["val"]):
        raise ConfigError(f"data.root: {root} must hold train/ and test/ (or val/) folders in ImageFolder layout "
                          f"(train/<class name>/<image>); found {', '.join(n for n, p in present.items() if p) or 'neither'}")
    test = folders["test"] if present["test"] else folders["val"]
    val = folders["val"] if present["val"] and present["test"] else None
    return {"train": folders["train"], "val": val, "test": test}


def _image_folder_sets(data: dict) -> dict:
    """``root/train`` (made long-tailed when data.imbalance is set), ``root/test`` / ``root/val`` read
    with the training folder's class names. Without a separate val folder, validation is the test set."""
    from ltfast.data.folders import read_image_folder
    roots = image_folder_roots(data["root"])
    try:
        train, names = read_image_folder(roots["train"], allow_empty=data["allow_empty_classes"])
        test = read_image_folder(roots["test"], names)[0]
        val = read_image_folder(roots["val"], names)[0] if roots["val"] else test
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data.root: {error}") from None
    num_classes = len(names)
    if data["num_classes"] is not None and data["num_classes"] != num_classes:
        raise ConfigError(f"data.num_classes: {data['num_classes']}, but {roots['train']} has {num_classes} class "
                          f"folders")
    if data["imbalance"] is not None:
        train = _long_tailed(train, data, num_classes, f"image folder {roots['train']}")
    counts = train.class_counts(num_classes)
    rule = (f"image folder {data['root']}: {len(train)} training images"
            + (f" ({data['profile']} profile, imbalance {data['imbalance']:g}, split seed {data['split_seed']})"
               if data["imbalance"] is not None else "")
            + ("" if roots["val"] else f"; validation = the test folder {roots['test']} (no separate val/)"))
    return {"train": train, "val": val, "test": test, "class_counts": [int(c) for c in counts],
            "class_names": names, "in_memory": False, "rule": rule}


def _check_list_splits(data: dict, splits: dict) -> int:
    """Start-up checks of list datasets, before any training: labels in range and no empty training
    class (file:line of the culprit), and every listed image present (unless data.check_files=false).
    Returns the class count. A bad label used to surface after an epoch, or as a 16-way model."""
    from ltfast.data import datasets
    try:
        num_classes = datasets.check_labels(splits, data["num_classes"], data["allow_empty_classes"])
    except ValueError as error:
        raise ConfigError(f"data labels: {error}") from None
    if data["check_files"]:
        for name, split in splits.items():
            if split is not None:
                datasets.check_files_exist(split, name)
    return num_classes


def make_loader(sets: dict, split: str, data: dict, *, sampler, batch_size: int, device, train: bool, seed: int,
                rank: Optional[int] = None, world: Optional[int] = None, view: str = "standard"):
    """DeviceTensorLoader for in-memory sets, the DALI (or PIL) pipeline for list files: both yield
    normalised float images and int64 labels on ``device`` and have set_epoch / len. ``view``: the
    image loaders' training transform (ltfast/data/augmentation.py: "standard", or a contrastive
    method's second view such as PaCo's "mocov2"); in-memory sets have only their own."""
    # data.mean / data.std, else the dataset's own statistics (CIFAR), else the loader's default
    norm = {k: tuple(data[k]) if data[k] is not None else sets[k] for k in ("mean", "std")
            if data[k] is not None or sets.get(k) is not None}
    if sets["in_memory"]:
        if view != "standard":
            raise ValueError(f"make_loader: view={view!r} is for image-path datasets; in-memory sets have one "
                             f"augmentation")
        from ltfast.data.loaders import DeviceTensorLoader
        return DeviceTensorLoader(sets[split], sampler, batch_size, device, train, pad=data["pad"], flip=data["flip"],
                                  drop_last=train, seed=seed, rank=rank, world_size=world, **norm)
    from ltfast.data.dali import make_image_loader
    threads = {"num_threads": data["num_threads"]} if data["num_threads"] else {}
    return make_image_loader(data["backend"], dataset=sets[split], sampler=sampler, batch_size=batch_size,
                             device=device, train=train, crop_size=data["crop_size"], resize_size=data["resize_size"],
                             color_jitter=data["color_jitter"], drop_last=train, seed=seed, rank=rank,
                             world_size=world, **threads, **norm, **({"view": view} if view != "standard" else {}))


def build_data(cfg: dict, rank: int, world: int, device) -> dict:
    from ltfast.data.samplers import make_sampler
    data, seed = cfg["data"], cfg["train"]["seed"]
    for key in ("batch_size", "eval_batch_size"):
        if data[key] % world:
            raise ConfigError(f"data.{key}: {data[key]} is not divisible by the {world} ranks")
    sets = load_datasets(data)
    extra = {}
    if data["sampler"] == "class_balanced":
        extra["num_samples_cls"] = data["num_samples_cls"]
    if data["sampler"] == "progressive":
        extra["total_epochs"] = cfg["optim"]["epochs"]
    # The sampler shards the training set (disjoint, equal length per rank); its stream and the
    # loader's augmentation are pure functions of (seed, epoch, rank): that is what makes resume exact.
    sampler = make_sampler(data["sampler"], sets["train"].labels, seed=seed, rank=rank, world_size=world, **extra)
    per_rank = data["batch_size"] // world
    out = dict(sets)
    out["train_loader"] = make_loader(sets, "train", data, sampler=sampler, batch_size=per_rank, device=device,
                                      train=True, seed=seed, rank=rank, world=world)
    # Evaluation: both loaders go through the set in order, rank::world_size under DDP (disjoint, no
    # padding), so the all-reduced per-class counts cover every image exactly once.
    for split in ("val", "test"):
        out[f"{split}_loader"] = None if sets[split] is None else make_loader(
            sets, split, data, sampler=None, batch_size=data["eval_batch_size"] // world, device=device,
            train=False, seed=seed, rank=rank, world=world)
    if len(out["train_loader"]) == 0:
        raise ConfigError(f"data.batch_size: {data['batch_size']} leaves no full batch per epoch "
                          f"({len(sets['train'])} training images over {world} ranks)")
    return out
