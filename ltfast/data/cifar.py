"""CIFAR-10-LT and CIFAR-100-LT from the standard python pickles, selected exactly as the
long-tail papers' generators select them.

    data = cifar_lt("/data", "cifar10", ratio=100)   # {"train", "val", "test", "class_names", "class_counts", ...}
    data["class_counts"].tolist()                     # [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    python -m ltfast.data.cifar /data --dataset cifar100 --imbalance 50   # prints the per-class counts

Layout (the one torchvision and the CIFAR web page use; nothing is downloaded): ``root`` holds
``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (and optionally
``batches.meta``) or ``cifar-100-python/`` with ``train``, ``test`` (and optionally ``meta``);
``root`` may also be that folder itself. Each file is a pickle of a dict with ``data`` (uint8
[N, 3072]: 1024 red, 1024 green, 1024 blue values, rows of 32) and ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100); the real files are Python-2 pickles whose keys read as ``b"data"``
with ``encoding="bytes"`` (the CIFAR page's recipe) and as ``"data"`` with ``encoding="latin1"``
(torchvision's). Both, and Python-3 pickles with either kind of key, are read.

The long-tailed training split is the one of LDAM-DRW (kaidic/LDAM-DRW ``imbalance_cifar.py``,
``IMBALANCECIFAR10.__init__`` / ``get_img_num_per_cls`` / ``gen_imbalanced_data``, lines 13-49),
copied verbatim by BBN (Megvii-Nanjing/BBN ``lib/dataset/imbalance_cifar.py`` lines 20-26, 43-57,
153-169; seed ``DATASET.IMBALANCECIFAR.RANDOM_SEED`` = 0), SADE (Vanint/SADE-AgnosticLT
``data_loader/imbalance_cifar.py`` lines 14-55) and LADE (hyperconnect/LADE
``data/ImbalanceCIFAR.py`` lines 61-96; numpy is seeded by ``main.py --seed`` (lines 57-60, no other
numpy draw before the training set is built) and its README runs ``--seed 1``, i.e. ``seed=1`` here):

- ``img_max = len(train images) / C`` (a float), ``imb_factor = 1 / ratio``;
- ``exp``: class i keeps ``int(img_max * imb_factor ** (i / (C - 1.0)))`` images (``reverse``:
  exponent ``(C - 1 - i) / (C - 1.0)``); ``step``: ``int(img_max)`` for the first ``C // 2`` classes,
  ``int(img_max * imb_factor)`` for the next ``C // 2``;
- ``np.random.seed(seed)`` (seed 0 by default, ``--rand_number``), then for each class in label
  order ``idx = np.where(targets == c)[0]; np.random.shuffle(idx)`` and the first n_i of ``idx``:
  NOT the first n_i images in file order. The training set is class 0's picks in that shuffled
  order, then class 1's, and so on; ``train_indices`` keeps that order.

The test set is the balanced 10,000 images; ``val`` is the test set, as in those codebases (SADE
issue #7: no separate validation split on CIFAR-LT), so model selection on ``val`` is selection on
the test set and a report should say so.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Sequence

import numpy as np
import torch

from .datasets import InMemoryDataset

CIFAR_LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "num_classes": 10,
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "label_key": "labels", "meta": "batches.meta", "names_key": "label_names"},
    "cifar100": {"folder": "cifar-100-python", "num_classes": 100, "train": ["train"], "test": ["test"],
                 "label_key": "fine_labels", "meta": "meta", "names_key": "fine_label_names"},
}
IMAGE_BYTES = 3 * 32 * 32


def _layout(dataset: str) -> dict:
    key = str(dataset).lower().replace("-", "").replace("_", "").removesuffix("lt")
    if key not in CIFAR_LAYOUTS:
        raise ValueError(f"dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    return CIFAR_LAYOUTS[key]


def find_cifar_folder(root: str, dataset: str = "cifar10") -> str:
    """The folder holding the pickles: ``root/cifar-10-batches-py`` (``cifar-100-python``) or
    ``root`` itself. FileNotFoundError listing every expected file and which are missing."""
    layout = _layout(dataset)
    needed = layout["train"] + layout["test"]
    candidates = [os.path.join(root, layout["folder"]), root]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name)) for name in needed):
            return folder
    folder = candidates[0] if os.path.isdir(candidates[0]) else candidates[1]
    missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
    raise FileNotFoundError(
        f"{dataset}: expected the python pickles {', '.join(needed)} in {candidates[0]} (or in {root} itself); "
        f"missing in {folder}: {', '.join(missing)}. Nothing is downloaded: unpack "
        f"{layout['folder']}.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into {root}.")


def _load_pickle(path: str) -> dict:
    """A CIFAR pickle as a dict with str keys. ``encoding="bytes"`` reads the Python-2 files (their
    strings become bytes, the numpy payload stays raw); bytes keys are then decoded."""
    with open(path, "rb") as f:
        try:
            entry = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
                KeyError, UnicodeDecodeError) as error:  # truncated or not a pickle: name the file
            raise ValueError(f"{path}: not a readable CIFAR pickle ({type(error).__name__}: {error})") from None
    if not isinstance(entry, dict):
        raise TypeError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    return {(key.decode("latin1") if isinstance(key, bytes) else key): value for key, value in entry.items()}


def _read_split(folder: str, files: Sequence[str], label_key: str, num_classes: int) -> InMemoryDataset:
    """The files' images (uint8 [N, 3, 32, 32], file order, as torchvision's ``np.vstack(...).reshape(-1, 3, 32, 32)``)
    and labels."""
    arrays, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        entry = _load_pickle(path)
        for key in ("data", label_key):
            if key not in entry:
                raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(entry)}); a CIFAR-100 file read as "
                                 f"CIFAR-10 or the other way round?")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
            raise ValueError(f"{path}: 'data' must be uint8 [N, {IMAGE_BYTES}], got {data.dtype} {data.shape}")
        file_labels = np.asarray(entry[label_key], dtype=np.int64)
        if file_labels.shape != (data.shape[0],):
            raise ValueError(f"{path}: {data.shape[0]} images but {file_labels.size} {label_key!r}")
        if file_labels.size and (file_labels.min() < 0 or file_labels.max() >= num_classes):
            raise ValueError(f"{path}: {label_key!r} must lie in [0, {num_classes}), got "
                             f"[{file_labels.min()}, {file_labels.max()}]")
        arrays.append(data)
        labels.append(file_labels)
    images = torch.from_numpy(np.vstack(arrays).reshape(-1, 3, 32, 32).copy())
    return InMemoryDataset(images, torch.from_numpy(np.concatenate(labels)))


def load_cifar(root: str, dataset: str = "cifar10") -> tuple[InMemoryDataset, InMemoryDataset, list[str]]:
    """(train, test, class_names) of the full CIFAR-10 / CIFAR-100 set in file order. Class names
    come from ``batches.meta`` / ``meta`` when present, else are the label numbers."""
    layout = _layout(dataset)
    folder = find_cifar_folder(root, dataset)
    train = _read_split(folder, layout["train"], layout["label_key"], layout["num_classes"])
    test = _read_split(folder, layout["test"], layout["label_key"], layout["num_classes"])
    names = [str(c) for c in range(layout["num_classes"])]
    meta_path = os.path.join(folder, layout["meta"])
    if os.path.isfile(meta_path):
        meta = _load_pickle(meta_path)
        if layout["names_key"] in meta:
            names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[layout["names_key"]]]
            if len(names) != layout["num_classes"]:
                raise ValueError(f"{meta_path}: {layout['names_key']!r} has {len(names)} names, expected "
                                 f"{layout['num_classes']}")
    return train, test, names


# ------------------------------------------------------------------ the generators' selection
def cifar_lt_counts(num_images: int, num_classes: int, ratio: float, profile: str = "exp",
                    reverse: bool = False) -> list[int]:
    """Images per class of the generators' ``get_img_num_per_cls`` (module docstring), transcribed
    operation by operation: ``img_max = num_images / num_classes`` stays a float (a folder of 4,999
    images gives 499.9, not 499) and the factor is ``1 / ratio`` multiplied in, as the generators get
    ``imb_factor`` (1/100 is the double 0.01 they are passed; 1/50 is 0.02, 1/10 is 0.1).
    ``ltfast.data.long_tailed_counts`` agrees for ``exp`` with an integer n_max; its ``step`` divides
    by the ratio (``n_max / 49`` and ``n_max * (1 / 49)`` differ in the last bit) and its n_max is an
    integer, hence this separate function."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if num_images < num_classes:
        raise ValueError(f"num_images ({num_images}) must be >= num_classes ({num_classes})")
    if not ratio >= 1:
        raise ValueError(f"ratio (imbalance n_max / n_min) must be >= 1, got {ratio}")
    img_max = num_images / num_classes
    imb_factor = 1.0 / ratio
    if profile == "exp":
        exponents = [((num_classes - 1 - i) if reverse else i) / (num_classes - 1.0) for i in range(num_classes)]
        return [int(img_max * (imb_factor ** e)) for e in exponents]
    if profile == "step":
        if num_classes % 2:
            # The generators' two loops of C // 2 give C - 1 counts for an odd C (and zip then drops a class).
            raise ValueError(f"the step profile needs an even number of classes, got {num_classes}")
        return [int(img_max)] * (num_classes // 2) + [int(img_max * imb_factor)] * (num_classes // 2)
    raise ValueError(f"profile must be 'exp' or 'step', got {profile!r}")


def cifar_lt_indices(labels, counts: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Indices (int64, the generators' order) of the long-tailed subset: a private
    ``np.random.RandomState(seed)`` (the same stream as ``np.random.seed(seed)``, without touching
    numpy's global state), then per class in label order ``idx = np.where(labels == c)[0]``,
    ``shuffle(idx)``, ``idx[:counts[c]]``. A class with fewer images than asked is an error (the
    generators would silently take fewer and then mislabel every later image)."""
    targets = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
    classes = np.unique(targets)
    if len(classes) != len(counts) or (classes != np.arange(len(counts))).any():
        raise ValueError(f"labels must hold every class 0..{len(counts) - 1} (the generators zip np.unique(labels) "
                         f"with the counts), got classes {classes.tolist()[:20]}")
    rng = np.random.RandomState(seed)
    chosen = []
    for the_class, the_img_num in zip(classes, counts):
        idx = np.where(targets == the_class)[0]
        if idx.size < the_img_num:
            raise ValueError(f"class {int(the_class)} has {idx.size} training images, the profile needs {the_img_num}")
        rng.shuffle(idx)
        chosen.append(idx[:the_img_num])
    return torch.from_numpy(np.concatenate(chosen).astype(np.int64))


def cifar_lt(root: str, dataset: str = "cifar10", ratio: float = 100, profile: str = "exp", seed: int = 0,
             reverse: bool = False) -> dict:
    """CIFAR-10-LT / CIFAR-100-LT (module docstring for the rule and its sources).

    Returns ``train`` (the long-tailed subset, uint8 [N, 3, 32, 32], generator order), ``test``
    (every test image, balanced), ``val`` (the same object as ``test``: the codebases validate on
    the test set), ``class_names``, ``class_counts`` (int64 [C], e.g. CIFAR-10 at ratio 100: 5000,
    2997, 1796, 1077, 645, 387, 232, 139, 83, 50 = 12,406 images; CIFAR-100: 500 ... 5 = 10,847),
    ``train_indices`` (into the file-order training set) and ``rule`` (one line naming the rule)."""
    train_full, test, names = load_cifar(root, dataset)
    num_classes = _layout(dataset)["num_classes"]
    counts = cifar_lt_counts(len(train_full), num_classes, ratio, profile, reverse)
    indices = cifar_lt_indices(train_full.labels, counts, seed)
    train = train_full.subset(indices)
    rule = (f"{dataset}-LT {profile} ratio {ratio:g}{' reversed' if reverse else ''}: n_max = "
            f"{len(train_full)}/{num_classes}, np.random.seed({seed}) + per-class shuffle "
            f"(LDAM-DRW imbalance_cifar.py / BBN / SADE / LADE)")
    return {"train": train, "val": test, "test": test, "class_names": names,
            "class_counts": train.class_counts(num_classes), "train_indices": indices, "rule": rule}


# ------------------------------------------------------------------ writing the pickle layout
class _Py2Str(bytes):
    """A Python-2 ``str``: pickled with the (SHORT_)BINSTRING opcode, so that it reads as bytes with
    ``encoding="bytes"`` and as str with ``encoding="latin1"``, as in the real CIFAR files."""


class _CifarPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj):
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str

    def save_global(self, obj, name=None):
        # numpy 2 names the array rebuilder numpy._core.multiarray, which numpy 1 cannot import; the
        # real files (and numpy 1 and 2 readers) use numpy.core.multiarray.
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:  # raw payload as a Python-2 str, as numpy 1 under Python 2 wrote it
            func, args, state = obj.__reduce__()
            version, shape, dtype, fortran, raw = state
            return func, (args[0], args[1], _Py2Str(args[2])), (version, shape, dtype, fortran, _Py2Str(raw))
        return NotImplemented


_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _py2(value):
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def write_cifar_pickle(path: str, entry: dict) -> None:
    """Writes ``entry`` (str keys; str values and lists of str become Python-2 strings; numpy arrays
    keep their raw bytes) as a protocol-2 pickle in the real files' form: readable with
    ``encoding="bytes"`` (keys ``b"data"``) and ``encoding="latin1"`` (keys ``"data"``, torchvision)."""
    buffer = io.BytesIO()
    _CifarPickler(buffer, protocol=2).dump({_py2(k): _py2(v) for k, v in entry.items()})
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def write_cifar_folder(root: str, dataset: str, train: InMemoryDataset, test: InMemoryDataset,
                       class_names: Sequence[str] | None = None) -> str:
    """Writes a train and a test set (uint8 [N, 3, 32, 32]) as ``root/cifar-10-batches-py/``
    (training images split in file order over ``data_batch_1..5``, ``test_batch``, ``batches.meta``)
    or ``root/cifar-100-python/`` (``train``, ``test``, ``meta``), with the keys of the real files
    (``batch_label``, ``labels`` / ``fine_labels`` (+ ``coarse_labels`` = 0 for CIFAR-100),
    ``data``, ``filenames``). Returns the folder."""
    layout = _layout(dataset)
    for name, split in (("train", train), ("test", test)):
        if not isinstance(split, InMemoryDataset) or tuple(split.images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"{name} must be an InMemoryDataset of uint8 [N, 3, 32, 32] images")
    folder = os.path.join(root, layout["folder"])
    os.makedirs(folder, exist_ok=True)
    cifar100 = layout["num_classes"] == 100

    def entry(split, part, start, stop, batch_label):
        labels = split.labels[start:stop].tolist()
        out = {"batch_label": batch_label}
        if cifar100:
            out.update({"fine_labels": labels, "coarse_labels": [0] * len(labels)})
        else:
            out["labels"] = labels
        out["data"] = split.images[start:stop].reshape(stop - start, IMAGE_BYTES).numpy().copy()
        out["filenames"] = [f"{part}_{i:06d}.png" for i in range(start, stop)]
        return out

    files = layout["train"]
    bounds = [len(train) * k // len(files) for k in range(len(files) + 1)]
    for k, name in enumerate(files):
        label = f"training batch {k + 1} of {len(files)}" if not cifar100 else "training"
        write_cifar_pickle(os.path.join(folder, name), entry(train, "train", bounds[k], bounds[k + 1], label))
    write_cifar_pickle(os.path.join(folder, layout["test"][0]),
                       entry(test, "test", 0, len(test), "testing batch 1 of 1" if not cifar100 else "testing"))
    names = list(class_names) if class_names is not None else [str(c) for c in range(layout["num_classes"])]
    if len(names) != layout["num_classes"]:
        raise ValueError(f"class_names must have {layout['num_classes']} names, got {len(names)}")
    meta = ({"fine_label_names": names, "coarse_label_names": ["all"]} if cifar100 else
            {"num_cases_per_batch": bounds[1] - bounds[0], "label_names": names, "num_vis": IMAGE_BYTES})
    write_cifar_pickle(os.path.join(folder, layout["meta"]), meta)
    return folder


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m ltfast.data.cifar",
                                     description="Prints the per-class counts of CIFAR-10/100-LT read from ROOT.")
    parser.add_argument("root", help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(CIFAR_LAYOUTS))
    parser.add_argument("--imbalance", type=float, default=[10, 50, 100], nargs="+")
    parser.add_argument("--profile", default="exp", choices=["exp", "step"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for ratio in args.imbalance:
        data = cifar_lt(args.root, args.dataset, ratio, args.profile, args.seed)
        counts = data["class_counts"].tolist()
        print(f"{data['rule']}: {sum(counts)} training images, {len(data['test'])} test images; "
              f"per class: {', '.join(map(str, counts))}")


if __name__ == "__main__":
    main()
