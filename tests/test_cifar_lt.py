"""CIFAR-10-LT / CIFAR-100-LT (ltfast.data.cifar) on CIFAR-format pickles built here: the per-class
counts at ratios 10 / 50 / 100, the images taken (against a literal transcription of LDAM-DRW's
generator), the test set, the errors, and the writer of the real files' pickle form."""
import itertools
import os
import pickle

import numpy as np
import pytest
import torch

from ltfast.data import long_tailed_counts
from ltfast.data.cifar import (
    cifar_lt,
    cifar_lt_counts,
    cifar_lt_indices,
    load_cifar,
    main,
    write_cifar_folder,
    write_cifar_pickle,
)
from ltfast.data.datasets import InMemoryDataset

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ------------------------------------------------------------------ the generator, transcribed
def ldam_drw_generator(data, targets, cls_num, imb_type, imb_factor, rand_number=0, reverse=False):
    """kaidic/LDAM-DRW imbalance_cifar.py (IMBALANCECIFAR10.__init__ lines 13-15,
    get_img_num_per_cls 17-31, gen_imbalanced_data 33-49), with SADE's ``reverse`` (SADE
    data_loader/imbalance_cifar.py lines 22-29), statement for statement on torchvision's
    ``self.data`` (NHWC) and ``self.targets``. Uses numpy's global RNG as they do."""
    np.random.seed(rand_number)
    img_max = len(data) / cls_num
    img_num_per_cls = []
    if imb_type == 'exp':
        for cls_idx in range(cls_num):
            if reverse:
                num = img_max * (imb_factor**((cls_num - 1 - cls_idx) / (cls_num - 1.0)))
                img_num_per_cls.append(int(num))
            else:
                num = img_max * (imb_factor**(cls_idx / (cls_num - 1.0)))
                img_num_per_cls.append(int(num))
    elif imb_type == 'step':
        for cls_idx in range(cls_num // 2):
            img_num_per_cls.append(int(img_max))
        for cls_idx in range(cls_num // 2):
            img_num_per_cls.append(int(img_max * imb_factor))
    new_data = []
    new_targets = []
    targets_np = np.array(targets, dtype=np.int64)
    classes = np.unique(targets_np)
    for the_class, the_img_num in zip(classes, img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        selec_idx = idx[:the_img_num]
        new_data.append(data[selec_idx, ...])
        new_targets.extend([the_class, ] * the_img_num)
    new_data = np.vstack(new_data)
    return new_data, new_targets, img_num_per_cls


@pytest.fixture(autouse=True)
def keep_numpy_global_rng():
    state = np.random.get_state()
    yield
    np.random.set_state(state)


# ------------------------------------------------------------------ CIFAR-format folders
def _random_split(rng, num_classes, per_class):
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    return rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8), labels


def _dump(path, entry):
    # The CIFAR page's layout as Python 3 writes it: bytes keys, as pickle.load(f, encoding="bytes") returns them.
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def build_cifar10(root, per_class=5000, test_per_class=1000, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    data, labels = _random_split(rng, 10, per_class)
    for k, part in enumerate(np.array_split(np.arange(labels.size), 5)):
        _dump(os.path.join(folder, f"data_batch_{k + 1}"),
              {b"batch_label": f"training batch {k + 1} of 5".encode(), b"labels": labels[part].tolist(),
               b"data": data[part], b"filenames": [f"{i}.png".encode() for i in part]})
    test_data, test_labels = _random_split(rng, 10, test_per_class)
    _dump(os.path.join(folder, "test_batch"), {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels.tolist(),
                                               b"data": test_data, b"filenames": [b"x.png"] * test_labels.size})
    _dump(os.path.join(folder, "batches.meta"), {b"label_names": [f"class{c}".encode() for c in range(10)],
                                                 b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return data, labels, test_data, test_labels


def build_cifar100(root, per_class=500, test_per_class=100, seed=1):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    data, labels = _random_split(rng, 100, per_class)
    _dump(os.path.join(folder, "train"), {b"filenames": [b"a.png"] * labels.size, b"batch_label": b"training",
                                          b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                                          b"data": data})
    test_data, test_labels = _random_split(rng, 100, test_per_class)
    _dump(os.path.join(folder, "test"), {b"filenames": [b"a.png"] * test_labels.size, b"batch_label": b"testing",
                                         b"fine_labels": test_labels.tolist(),
                                         b"coarse_labels": (test_labels // 5).tolist(), b"data": test_data})
    return data, labels, test_data, test_labels


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar10"))
    return root, build_cifar10(root)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar100"))
    return root, build_cifar100(root)


def nhwc(data):
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # torchvision's self.data


# ------------------------------------------------------------------ counts
# The LDAM-DRW paper's CIFAR-10-LT at ratio 100 (12,406 images) and the list.
CIFAR10_COUNTS = {
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
}
# CIFAR-100-LT totals (seed-methods §3.2: 10,847 at ratio 100), head and tail.
CIFAR100_TOTALS = {10: (19573, 500, 50), 50: (12608, 500, 10), 100: (10847, 500, 5)}


@pytest.mark.parametrize("ratio", [10, 50, 100])
def test_cifar10_lt_counts_images_and_test_set(cifar10, ratio):
    root, (data, labels, test_data, test_labels) = cifar10
    before = np.random.get_state()[1].copy()
    out = cifar_lt(root, "cifar10", ratio=ratio)
    assert (np.random.get_state()[1] == before).all()  # numpy's global RNG is left alone
    assert out["class_counts"].tolist() == CIFAR10_COUNTS[ratio]
    expected_data, expected_targets, expected_counts = ldam_drw_generator(nhwc(data), labels.tolist(), 10, "exp",
                                                                          1 / ratio)
    assert expected_counts == CIFAR10_COUNTS[ratio]
    train = out["train"]
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape[1:]) == (3, 32, 32)
    assert np.array_equal(train.images.permute(0, 2, 3, 1).numpy(), expected_data)  # same images, same order
    assert train.labels.tolist() == [int(t) for t in expected_targets]
    assert np.array_equal(data[out["train_indices"].numpy()], train.images.reshape(-1, 3072).numpy())
    assert out["test"] is out["val"]
    assert np.array_equal(out["test"].images.reshape(-1, 3072).numpy(), test_data)
    assert out["test"].labels.tolist() == test_labels.tolist()
    assert out["test"].class_counts().tolist() == [1000] * 10
    assert out["class_names"] == [f"class{c}" for c in range(10)]


@pytest.mark.parametrize("ratio", [10, 50, 100])
def test_cifar100_lt_counts_images_and_test_set(cifar100, ratio):
    root, (data, labels, test_data, test_labels) = cifar100
    out = cifar_lt(root, "cifar100", ratio=ratio)
    counts = out["class_counts"].tolist()
    total, head, tail = CIFAR100_TOTALS[ratio]
    assert (sum(counts), counts[0], counts[-1]) == (total, head, tail)
    assert all(a >= b for a, b in itertools.pairwise(counts))
    expected_data, expected_targets, expected_counts = ldam_drw_generator(nhwc(data), labels.tolist(), 100, "exp",
                                                                          1 / ratio)
    assert counts == expected_counts
    assert np.array_equal(out["train"].images.permute(0, 2, 3, 1).numpy(), expected_data)
    assert out["train"].labels.tolist() == [int(t) for t in expected_targets]
    assert np.array_equal(out["test"].images.reshape(-1, 3072).numpy(), test_data)
    assert out["test"].labels.tolist() == test_labels.tolist() and out["val"] is out["test"]
    assert out["class_names"] == [str(c) for c in range(100)]  # no meta file: label numbers


def test_factor_is_the_generators_literal_and_counts_agree_with_long_tailed_counts():
    for ratio, literal in ((100, 0.01), (50, 0.02), (10, 0.1)):
        assert 1.0 / ratio == literal  # the double the generators are passed (--imb_factor 0.01 ...)
        for classes in (10, 100):
            n_max = 50000 // classes
            assert cifar_lt_counts(50000, classes, ratio) == long_tailed_counts(n_max, classes, ratio)


@pytest.mark.parametrize("profile,reverse,seed", [("step", False, 0), ("exp", True, 0), ("exp", False, 3)])
def test_step_reverse_and_seed_follow_the_generator(cifar10, profile, reverse, seed):
    _, (data, labels, _, _) = cifar10
    # cifar_lt's parts on the written labels (cifar_lt itself, i.e. reading, is tested above)
    counts = cifar_lt_counts(labels.size, 10, 10, profile, reverse)
    indices = cifar_lt_indices(torch.from_numpy(labels), counts, seed).numpy()
    expected_data, expected_targets, expected_counts = ldam_drw_generator(nhwc(data), labels.tolist(), 10, profile,
                                                                          0.1, rand_number=seed, reverse=reverse)
    assert counts == expected_counts
    assert np.array_equal(nhwc(data[indices]), expected_data)
    assert labels[indices].tolist() == [int(t) for t in expected_targets]
    if profile == "step":
        assert expected_counts == [5000] * 5 + [500] * 5
    if reverse:
        assert expected_counts == CIFAR10_COUNTS[10][::-1]


def test_step_profile_multiplies_by_the_factor_as_the_generators_do():
    # 49 * (1/49) is 0.9999999999999999 in doubles: the generators keep 0 images, n / ratio would give 1.
    assert cifar_lt_counts(490, 10, 49, "step") == [49] * 5 + [0] * 5
    assert long_tailed_counts(49, 10, 49, "step") == [49] * 5 + [1] * 5  # unchanged behaviour of the old helper
    with pytest.raises(ValueError, match="even number of classes"):
        cifar_lt_counts(99, 9, 10, "step")


def test_a_smaller_folder_takes_n_max_from_its_size(tmp_path):
    rng = np.random.default_rng(5)
    # 1,001 images: img_max = 100.1 stays a float, as len(self.data) / cls_num does.
    labels = rng.permutation(np.concatenate([np.full(101, 0)] + [np.full(100, c) for c in range(1, 10)]))
    data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
    train = InMemoryDataset(torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels))
    test = InMemoryDataset(torch.from_numpy(data[:20].reshape(-1, 3, 32, 32)), torch.arange(20) % 10)
    write_cifar_folder(str(tmp_path), "cifar10", train, test)
    out = cifar_lt(str(tmp_path), "cifar10", ratio=10)
    expected_data, _, expected_counts = ldam_drw_generator(nhwc(data), labels.tolist(), 10, "exp", 0.1)
    assert expected_counts[0] == 100 and out["class_counts"].tolist() == expected_counts
    assert expected_counts != long_tailed_counts(100, 10, 10)  # 100.1 * 0.1 ** (1/9) vs 100 * ...
    assert np.array_equal(out["train"].images.permute(0, 2, 3, 1).numpy(), expected_data)


def test_a_class_with_too_few_images_is_an_error(tmp_path):
    labels = np.concatenate([np.full(50, 0)] + [np.full(120, c) for c in range(1, 10)])
    images = torch.zeros(labels.size, 3, 32, 32, dtype=torch.uint8)
    write_cifar_folder(str(tmp_path), "cifar10", InMemoryDataset(images, torch.from_numpy(labels)),
                       InMemoryDataset(images[:10], torch.arange(10)))
    with pytest.raises(ValueError, match="class 0 has 50 training images, the profile needs 113"):
        cifar_lt(str(tmp_path), "cifar10", ratio=10)


# ------------------------------------------------------------------ layout and errors
def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        cifar_lt(str(tmp_path), "cifar10")
    message = str(error.value)
    assert "cifar-10-batches-py" in message and all(name in message for name in CIFAR10_FILES)
    build_cifar10(str(tmp_path), per_class=3, test_per_class=1)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match=r"missing in .*cifar-10-batches-py: data_batch_3\."):
        load_cifar(str(tmp_path), "cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-100-python.*train, test"):
        load_cifar(str(tmp_path), "cifar100")
    with pytest.raises(ValueError, match="dataset must be 'cifar10' or 'cifar100'"):
        load_cifar(str(tmp_path), "cifar20")


def test_root_may_be_the_batches_folder_and_wrong_files_are_named(tmp_path):
    build_cifar10(str(tmp_path), per_class=4, test_per_class=2)
    folder = str(tmp_path / "cifar-10-batches-py")
    train, test, names = load_cifar(folder, "cifar10")
    assert (len(train), len(test), names[0]) == (40, 20, "class0")
    # A CIFAR-100 file where CIFAR-10 expects 'labels'.
    _dump(os.path.join(folder, "test_batch"), {b"fine_labels": [0], b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(ValueError, match="test_batch: no 'labels' entry"):
        load_cifar(folder, "cifar10")
    _dump(os.path.join(folder, "test_batch"), {b"labels": [0, 1], b"data": np.zeros((2, 1024), np.uint8)})
    with pytest.raises(ValueError, match=r"'data' must be uint8 \[N, 3072\]"):
        load_cifar(folder, "cifar10")
    _dump(os.path.join(folder, "test_batch"), {b"labels": [10], b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(ValueError, match=r"'labels' must lie in \[0, 10\)"):
        load_cifar(folder, "cifar10")
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"\x80\x02}q")
    with pytest.raises(ValueError, match="test_batch: not a readable CIFAR pickle"):
        load_cifar(folder, "cifar10")


def test_writer_produces_the_real_files_form(tmp_path):
    """Keys read as b"data" with encoding="bytes" (the CIFAR page) and as "data" with
    encoding="latin1" (torchvision), the array's global is numpy.core.multiarray as in the real
    files; torchvision's own reader, when installed, sees the same images and labels."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (30, 3, 32, 32), dtype=np.uint8))
    train = InMemoryDataset(images, torch.arange(30) % 10)
    test = InMemoryDataset(images[:10].flip(0).contiguous(), torch.arange(10))
    write_cifar_folder(str(tmp_path), "cifar10", train, test, [f"n{c}" for c in range(10)])
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"U\x04data" in raw  # SHORT_BINSTRING key
    as_bytes = pickle.loads(raw, encoding="bytes")
    as_latin1 = pickle.loads(raw, encoding="latin1")
    assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"} and set(as_latin1) == {
        "batch_label", "labels", "data", "filenames"}
    assert as_latin1["labels"] == list(range(6, 10)) + list(range(2))  # images 6..11 of 30 (5 batches of 6)
    assert np.array_equal(as_bytes[b"data"], images[6:12].reshape(6, 3072).numpy())
    back_train, back_test, names = load_cifar(str(tmp_path), "cifar10")
    assert torch.equal(back_train.images, images) and torch.equal(back_test.images, test.images)
    assert names == [f"n{c}" for c in range(10)]
    torchvision_cifar = pytest.importorskip("torchvision.datasets.cifar")
    original = torchvision_cifar.check_integrity
    torchvision_cifar.check_integrity = lambda *args, **kwargs: True  # md5s of the real files
    try:
        reference = torchvision_cifar.CIFAR10(str(tmp_path), train=True)
    finally:
        torchvision_cifar.check_integrity = original
    assert np.array_equal(reference.data, images.permute(0, 2, 3, 1).numpy())
    assert reference.targets == train.labels.tolist() and reference.classes == names


def test_writer_cifar100_and_str_keys(tmp_path):
    images = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(200, dtype=torch.uint8)
    labels = torch.arange(200) % 100
    write_cifar_folder(str(tmp_path), "cifar100", InMemoryDataset(images, labels),
                       InMemoryDataset(images[:100], labels[:100]))
    entry = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes(), encoding="latin1")
    assert entry["fine_labels"] == labels.tolist() and entry["data"].shape == (200, 3072)
    out = cifar_lt(str(tmp_path), "cifar100", ratio=2)
    assert out["class_counts"].tolist() == cifar_lt_counts(200, 100, 2) and out["class_counts"][0] == 2
    # A Python 3 pickle with str keys reads too.
    write_cifar_pickle(str(tmp_path / "plain"), {"labels": [1], "data": np.ones((1, 3072), np.uint8)})
    assert pickle.loads((tmp_path / "plain").read_bytes(), encoding="bytes")[b"labels"] == [1]


def test_cli_prints_the_counts(cifar10, capsys):
    root, _ = cifar10
    main([root, "--dataset", "cifar10", "--imbalance", "100"])
    printed = capsys.readouterr().out
    assert "12406 training images" in printed and "5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50" in printed


# ------------------------------------------------------------------ ResNet-32 (ltfast.train.models.resnet_cifar)
class _LdamLambdaLayer(torch.nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class _LdamBasicBlock(torch.nn.Module):
    """kaidic/LDAM-DRW models/resnet_cifar.py BasicBlock (option A), lines 58-87."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        nn, F = torch.nn, torch.nn.functional
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _LdamLambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4),
                                                             "constant", 0))

    def forward(self, x):
        F = torch.nn.functional
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _LdamNormedLinear(torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.Tensor(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x):
        F = torch.nn.functional
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class _LdamResNet32(torch.nn.Module):
    """LDAM-DRW ResNet_s(BasicBlock, [5, 5, 5]) with _weights_init, lines 32-35 and 90-124."""

    def __init__(self, num_classes=10, use_norm=False):
        super().__init__()
        nn = torch.nn
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 5, 1)
        self.layer2 = self._make_layer(32, 5, 2)
        self.layer3 = self._make_layer(64, 5, 2)
        self.linear = _LdamNormedLinear(64, num_classes) if use_norm else nn.Linear(64, num_classes)

        def _weights_init(m):
            if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d):  # noqa: SIM101  (verbatim)
                nn.init.kaiming_normal_(m.weight)
        self.apply(_weights_init)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_LdamBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return torch.nn.Sequential(*layers)

    def forward(self, x):
        F = torch.nn.functional
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def resnet32_parameters(num_classes, use_norm=False):
    """Counted by hand: stem conv + BN, per stage 5 blocks of two 3x3 convs and two BNs (option-A
    shortcuts have no parameters), then the classifier."""
    stem = 3 * 16 * 9 + 2 * 16
    stages, in_planes = 0, 16
    for planes in (16, 32, 64):
        for block in range(5):
            stages += (in_planes if block == 0 else planes) * planes * 9 + planes * planes * 9 + 4 * planes
        in_planes = planes
    return stem + stages + 64 * num_classes + (0 if use_norm else num_classes)


@pytest.fixture
def one_thread():
    """A ResNet-32 forward of 4 images took 4.9 s with 2 intra-op threads on the shared 2-core
    machine (load 17: the OpenMP threads wait on each other) and 0.05 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("num_classes,use_norm", [(10, False), (100, False), (10, True)])
def test_resnet32_matches_ldam_drw(num_classes, use_norm, one_thread):
    from ltfast.train.models.resnet_cifar import resnet32
    torch.manual_seed(0)
    ours = resnet32(num_classes, use_norm=use_norm)
    torch.manual_seed(0)
    theirs = _LdamResNet32(num_classes, use_norm=use_norm)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == resnet32_parameters(num_classes, use_norm)
    if (num_classes, use_norm) == (10, False):
        assert count == 464_154  # the 0.46M of LDAM-DRW's table
    # Same draws in the same order: identical weights (the normed head stored transposed), identical outputs.
    mine = dict(ours.named_parameters())
    for name, theirs_param in theirs.named_parameters():
        ours_param = mine[name.replace("linear.", "fc.")]
        expected = theirs_param.t() if use_norm and name == "linear.weight" else theirs_param
        assert torch.equal(ours_param, expected), name
    x = torch.randn(4, 3, 32, 32)
    ours.train(), theirs.train()
    # Bit for bit with the linear head; the cosine head's matmul runs on the transposed layout (ulps apart).
    exact = {} if use_norm else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(ours(x), theirs(x), **exact)
    ours.eval(), theirs.eval()
    features = ours.forward_features(x)
    assert features.shape == (4, 64, 8, 8)
    assert ours.forward_head(features, pre_logits=True).shape == (4, 64)
    logits = ours.forward_head(features)
    assert logits.shape == (4, num_classes)
    torch.testing.assert_close(logits, theirs(x))
    if use_norm:
        assert logits.abs().max() <= 1 + 1e-6  # cosines
        assert torch.allclose(ours.fc.weight.norm(dim=1), torch.ones(num_classes))


def test_resnet_cifar_depths_and_errors(one_thread):
    from ltfast.train.models.resnet_cifar import resnet_cifar
    assert len(resnet_cifar(20).layer1) == 3 and len(resnet_cifar(56).layer3) == 9
    assert resnet_cifar(32, 7, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        resnet_cifar(33)


# ------------------------------------------------------------------ scripts/make_cifar_format_fmnist.py
def test_fashion_mnist_in_cifar10_layout(tmp_path, capsys):
    """Fashion-MNIST (Debian's dataset-fashion-mnist, installed in CI) written as CIFAR-10: 28x28
    grey padded to 32x32x3, the first n images of each class in file order, the whole test set."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from make_cifar_format_fmnist import main as make_folder

    from ltfast.data import FASHION_MNIST_CLASSES, load_fashion_mnist
    make_folder([str(tmp_path), "--per-class", "100"])
    printed = capsys.readouterr().out
    train, test, names = load_cifar(str(tmp_path), "cifar10")
    source_train, source_test = load_fashion_mnist()
    keep = torch.cat([torch.nonzero(source_train.labels == c).flatten()[:100] for c in range(10)]).sort().values
    assert names == FASHION_MNIST_CLASSES and len(train) == 1000 and len(test) == 10000
    assert torch.equal(train.labels, source_train.labels[keep])
    assert torch.equal(train.images[:, :, 2:30, 2:30], source_train.images[keep].expand(-1, 3, -1, -1))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(train.images[:, :, border].max()) == 0 and int(test.images[:, :, border].max()) == 0
    assert torch.equal(test.images[:, 1, 2:30, 2:30], source_test.images[:, 0])
    counts = cifar_lt_counts(1000, 10, 100)
    assert counts[0] == 100 and counts[-1] == 1
    assert f"ratio 100: {sum(counts)} training images: {', '.join(map(str, counts))}" in printed
