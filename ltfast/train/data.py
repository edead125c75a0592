"""The data of a run: the datasets the ``data`` section names (Fashion-MNIST-LT and synthetic sets in
memory, list files of image paths), and the loaders that feed them to the trainer, sharded over the
DDP ranks. In-memory sets go through ``ltfast.data.loaders.DeviceTensorLoader``, list files through
the DALI pipeline or its PIL baseline (``ltfast.data``)."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError


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
    counts = datasets.class_counts(train.labels, num_classes)
    return {"train": train, "val": val, "test": test, "class_counts": [int(c) for c in counts],
            "class_names": None, "in_memory": False}


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
                rank: Optional[int] = None, world: Optional[int] = None):
    """DeviceTensorLoader for in-memory sets, the DALI (or PIL) pipeline for list files: both yield
    normalised float images and int64 labels on ``device`` and have set_epoch / len."""
    norm = {k: tuple(data[k]) for k in ("mean", "std") if data[k] is not None}
    if sets["in_memory"]:
        from ltfast.data.loaders import DeviceTensorLoader
        return DeviceTensorLoader(sets[split], sampler, batch_size, device, train, pad=data["pad"], flip=data["flip"],
                                  drop_last=train, seed=seed, rank=rank, world_size=world, **norm)
    from ltfast.data.dali import make_image_loader
    threads = {"num_threads": data["num_threads"]} if data["num_threads"] else {}
    return make_image_loader(data["backend"], dataset=sets[split], sampler=sampler, batch_size=batch_size,
                             device=device, train=train, crop_size=data["crop_size"], resize_size=data["resize_size"],
                             color_jitter=data["color_jitter"], drop_last=train, seed=seed, rank=rank,
                             world_size=world, **threads, **norm)


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
