"""Class-aware samplers and the index-draw ops behind them (ltfast.data.samplers)."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import device_params
from ltfast import reference
from ltfast.data import (ClassBalancedSampler, InstanceSampler, ProgressivelyBalancedSampler, SquareRootSampler,
                         make_sampler)


def long_tail_labels(num_classes=12, n_max=300, ratio=50, seed=0):
    counts = [max(1, int(n_max * (1 / ratio) ** (i / (num_classes - 1)))) for i in range(num_classes)]
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))], torch.tensor(counts)


def class_table(sizes, device="cpu", seed=0):
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes), 0)
    members = torch.randperm(int(offsets[-1]), generator=torch.Generator().manual_seed(seed))
    return offsets.to(device), members.to(device)


# ------------------------------------------------------------------ the ops against the reference
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("sizes", [[1], [5], [3, 7, 1, 39], [1] * 17, [1000, 2, 513]])
@pytest.mark.parametrize("seed,epoch,start,count,per_class,epoch_length", [
    (0, 0, 0, 37, 4, 37), (2**62 + 5, 3, 7, 20, 1, 40), (-7, 12, 0, 101, 3, 101), (1, 2**33, 5, 64, 4, 200)])
def test_class_aware_op_matches_reference(device, sizes, seed, epoch, start, count, per_class, epoch_length):
    offsets, members = class_table(sizes, device)
    args = (seed, epoch, start, count, per_class, epoch_length)
    got = torch.ops.ltfast.class_aware_sample(offsets, members, *args)
    assert got.device.type == device and got.dtype == torch.int64 and got.shape == (count,)
    assert torch.equal(got.cpu(), reference.class_aware_sample(offsets.cpu(), members.cpu(), *args))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("sizes,probabilities", [([4], [1.0]), ([3, 7, 1, 39], [0.1, 0.4, 0.0, 0.5]),
                                                 ([2, 9, 5], [0.2, 0.3, 0.5])])
@pytest.mark.parametrize("seed,epoch,start,count,epoch_length", [(0, 0, 0, 50, 50), (-3, 9, 5, 60, 100)])
def test_class_weighted_op_matches_reference(device, sizes, probabilities, seed, epoch, start, count, epoch_length):
    offsets, members = class_table(sizes, device)
    cdf = torch.cumsum(torch.tensor(probabilities, dtype=torch.float64), 0)
    cdf[-1] = 1.0
    args = (seed, epoch, start, count, epoch_length)
    got = torch.ops.ltfast.class_weighted_sample(cdf.to(device), offsets, members, *args)
    assert torch.equal(got.cpu(), reference.class_weighted_sample(cdf, offsets.cpu(), members.cpu(), *args))
    if 0.0 in probabilities:  # a class with probability 0 is never drawn
        empty = probabilities.index(0.0)
        banned = members.cpu()[offsets[empty]:offsets[empty + 1]]
        assert not torch.isin(got.cpu(), banned).any()


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    offsets, members = class_table([3, 7, 1, 39], device)
    cdf = torch.tensor([0.1, 0.5, 0.6, 1.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.ltfast.class_aware_sample, (offsets, members, 3, 1, 2, 30, 4, 40))
    torch.library.opcheck(torch.ops.ltfast.class_weighted_sample, (cdf, offsets, members, 3, 1, 2, 30, 40))


@pytest.mark.parametrize("device", device_params())
def test_bad_class_tables_are_rejected_on_every_device(device):
    # The table values were checked for CPU tensors only: on CUDA an empty class made the kernel
    # draw `hash % 0` and read outside `members` (on the `cuda` device this test failed before).
    members = torch.arange(7, device=device)
    empty_class = torch.tensor([0, 3, 3, 7], device=device)
    with pytest.raises(ValueError, match="strictly increasing"):
        torch.ops.ltfast.class_aware_sample(empty_class, members, 0, 0, 0, 4, 1, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        torch.ops.ltfast.class_weighted_sample(torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64, device=device),
                                               empty_class, members, 0, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="must end at members.numel"):
        torch.ops.ltfast.class_aware_sample(torch.tensor([0, 3, 6], device=device), members, 0, 0, 0, 4, 1, 4)
    offsets, members = class_table([3, 4], device)
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.ltfast.class_weighted_sample(torch.tensor([0.7, 0.2], dtype=torch.float64, device=device),
                                               offsets, members, 0, 0, 0, 4, 4)
    # a valid call on the same device still works (and, for `simt`, runs the emulated kernel)
    assert torch.ops.ltfast.class_aware_sample(offsets, members, 0, 0, 0, 4, 1, 4).shape == (4,)


def test_op_errors_name_the_argument():
    offsets, members = class_table([3, 4])
    with pytest.raises(ValueError, match="num_samples_cls must be >= 1"):
        torch.ops.ltfast.class_aware_sample(offsets, members, 0, 0, 0, 4, 0, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        torch.ops.ltfast.class_aware_sample(torch.tensor([0, 3, 3, 7]), members, 0, 0, 0, 4, 1, 4)
    with pytest.raises(ValueError, match="must end at members.numel"):
        torch.ops.ltfast.class_aware_sample(torch.tensor([0, 3, 6]), members, 0, 0, 0, 4, 1, 4)
    with pytest.raises(ValueError, match="must not exceed epoch_length"):
        torch.ops.ltfast.class_aware_sample(offsets, members, 0, 0, 2, 4, 1, 5)
    with pytest.raises(TypeError, match="members must be int64"):
        torch.ops.ltfast.class_aware_sample(offsets, members.int(), 0, 0, 0, 4, 1, 4)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        torch.ops.ltfast.class_aware_sample(offsets, members, 0, -1, 0, 4, 1, 4)
    with pytest.raises(ValueError, match="class_cdf must end at 1"):
        torch.ops.ltfast.class_weighted_sample(torch.tensor([0.2, 0.9], dtype=torch.float64), offsets, members,
                                               0, 0, 0, 4, 4)
    with pytest.raises(ValueError, match="class_cdf must be a 1-D tensor with C = 2"):
        torch.ops.ltfast.class_weighted_sample(torch.tensor([1.0], dtype=torch.float64), offsets, members,
                                               0, 0, 0, 4, 4)


# ------------------------------------------------------------------ sampler semantics
def test_class_balanced_visits_every_class_once_per_cycle_and_groups_per_class():
    labels, counts = long_tail_labels()
    num_classes, per_class = counts.numel(), 4
    cycles = 5
    sampler = ClassBalancedSampler(labels, num_samples_cls=per_class, num_samples=cycles * num_classes * per_class)
    drawn = labels[sampler.indices()]
    groups = drawn.view(-1, per_class)
    assert (groups == groups[:, :1]).all(), "each visit yields num_samples_cls images of one class"
    for cycle in groups[:, 0].view(cycles, num_classes):
        assert sorted(cycle.tolist()) == list(range(num_classes)), "a cycle is a shuffle of all classes"


def test_class_balanced_cycles_through_each_class_before_repeating():
    labels, counts = long_tail_labels(num_classes=4, n_max=20, ratio=4)
    sampler = ClassBalancedSampler(labels, num_samples_cls=3, num_samples=4 * 3 * 40)
    indices = sampler.indices()
    for c, n_c in enumerate(counts.tolist()):
        of_class = indices[labels[indices] == c]
        for start in range(0, of_class.numel() - n_c + 1, n_c):
            # each wrap of the class's own cycle is a permutation of its images
            assert sorted(of_class[start:start + n_c].tolist()) == sorted(torch.nonzero(labels == c).flatten().tolist())


def test_class_balanced_continues_its_cycles_across_epochs():
    """The survey's iterators persist across epochs: epoch 1 goes on where epoch 0's cycles stopped."""
    labels, counts = long_tail_labels(num_classes=5, n_max=30, ratio=10)
    per_epoch = ClassBalancedSampler(labels, num_samples_cls=2, num_samples=40)
    per_epoch.set_epoch(1)
    long = ClassBalancedSampler(labels, num_samples_cls=2, num_samples=80)
    assert torch.equal(per_epoch.indices(), long.indices()[40:])


def test_class_balanced_frequencies_are_uniform_and_within_class_uniform():
    labels, counts = long_tail_labels(num_classes=10, n_max=500, ratio=100)
    sampler = ClassBalancedSampler(labels, num_samples_cls=4, num_samples=40_000)
    per_class = torch.bincount(labels[sampler.indices()], minlength=10)
    assert (per_class == 4000).all()  # 1000 whole cycles: exactly uniform
    head = torch.bincount(sampler.indices()[labels[sampler.indices()] == 0], minlength=labels.numel())
    head = head[labels == 0]
    assert head.min() >= 7 and head.max() <= 9  # 4000 draws over 500 images in whole cycles: 8 each (+-1)


def test_square_root_frequencies():
    labels, counts = long_tail_labels(num_classes=8, n_max=400, ratio=100)
    sampler = SquareRootSampler(labels, num_samples=200_000)
    observed = torch.bincount(labels[sampler.indices()], minlength=8).double() / 200_000
    expected = counts.double().sqrt() / counts.double().sqrt().sum()
    # binomial standard error <= sqrt(0.25 / 2e5) = 1.1e-3; 5 sigma
    assert (observed - expected).abs().max() < 5.6e-3


def test_progressive_moves_from_instance_to_class_balanced():
    labels, counts = long_tail_labels(num_classes=6, n_max=300, ratio=30)
    sampler = ProgressivelyBalancedSampler(labels, total_epochs=5, num_samples=120_000)
    instance = counts.double() / counts.sum()
    for epoch, t in [(0, 0.0), (2, 0.5), (4, 1.0), (9, 1.0)]:
        sampler.set_epoch(epoch)
        observed = torch.bincount(labels[sampler.indices()], minlength=6).double() / 120_000
        expected = (1 - t) * instance + t / 6
        assert (observed - expected).abs().max() < 7e-3, (epoch, observed, expected)


def test_instance_sampler_is_a_fresh_permutation_every_epoch():
    labels, _ = long_tail_labels()
    sampler = InstanceSampler(labels)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = sampler.indices()
        assert torch.equal(order.sort().values, torch.arange(labels.numel()))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


@pytest.mark.parametrize("name", ["instance", "class_balanced", "square_root", "progressive"])
def test_stream_is_a_pure_function_of_seed_epoch_rank(name):
    labels, _ = long_tail_labels()
    kwargs = {"total_epochs": 10} if name == "progressive" else {}
    a = make_sampler(name, labels, seed=3, **kwargs)
    b = make_sampler(name, labels, seed=3, **kwargs)
    a.set_epoch(4)
    for epoch in (0, 1, 2, 3, 4):  # b reaches epoch 4 through others: no hidden state
        b.set_epoch(epoch)
        list(b)
    assert torch.equal(a.indices(), b.indices())
    assert list(a) == a.indices().tolist()
    a.set_epoch(5)
    assert not torch.equal(a.indices(), b.indices()), "set_epoch must change the order"
    c = make_sampler(name, labels, seed=4, **kwargs)
    c.set_epoch(4)
    assert not torch.equal(c.indices(), b.indices()), "the seed must change the order"


@pytest.mark.parametrize("name", ["instance", "class_balanced", "square_root", "progressive"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_equal_and_disjoint(name, world_size):
    labels, _ = long_tail_labels()
    kwargs = {"total_epochs": 10} if name == "progressive" else {}
    shards = []
    for rank in range(world_size):
        sampler = make_sampler(name, labels, seed=1, rank=rank, world_size=world_size, **kwargs)
        sampler.set_epoch(2)
        assert len(sampler) == labels.numel() // world_size
        shards.append(sampler.indices())
    assert len({s.numel() for s in shards}) == 1
    whole = make_sampler(name, labels, seed=1, rank=0, world_size=1,
                         num_samples=world_size * shards[0].numel(), **kwargs)
    whole.set_epoch(2)
    if name != "instance":  # the shards are disjoint slices of one epoch stream
        assert torch.equal(torch.cat(shards), whole.indices())
    else:  # instance: a permutation, so the shards share no image
        joined = torch.cat(shards)
        assert joined.unique().numel() == joined.numel()


def test_empty_classes_are_skipped():
    labels = torch.tensor([0, 0, 0, 2, 2, 5])  # classes 1, 3, 4 absent
    sampler = ClassBalancedSampler(labels, num_samples_cls=1, num_samples=30)
    assert set(labels[sampler.indices()].tolist()) == {0, 2, 5}
    assert (torch.bincount(labels[sampler.indices()]) [[0, 2, 5]] == 10).all()
    assert set(labels[SquareRootSampler(labels, num_samples=300).indices()].tolist()) == {0, 2, 5}


def test_works_as_a_dataloader_sampler():
    labels, _ = long_tail_labels()
    dataset = TensorDataset(torch.arange(labels.numel()), labels)
    sampler = ClassBalancedSampler(labels, num_samples_cls=4, seed=2)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, drop_last=True)
    indices = torch.cat([batch[0] for batch in loader])
    assert torch.equal(indices, sampler.indices()[:indices.numel()])
    assert len(loader) == len(sampler) // 16


def test_state_dict_round_trip():
    labels, _ = long_tail_labels()
    a = ClassBalancedSampler(labels, seed=5)
    a.set_epoch(7)
    b = ClassBalancedSampler(labels, seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.indices(), b.indices())
    with pytest.raises(ValueError, match="seed"):
        ClassBalancedSampler(labels, seed=6).load_state_dict(a.state_dict())


def test_fallback_matches_the_ops(monkeypatch):
    import ltfast
    labels, _ = long_tail_labels()
    samplers = [ClassBalancedSampler(labels, seed=9), SquareRootSampler(labels, seed=9), InstanceSampler(labels, seed=9)]
    compiled = [s.indices() for s in samplers]
    monkeypatch.setattr(ltfast._extension, "AVAILABLE", False)
    with pytest.warns(RuntimeWarning, match="compiled kernels are unavailable"):
        monkeypatch.setattr(ltfast._extension, "_warned", False)
        fallback = [s.indices() for s in samplers]
    for a, b in zip(compiled, fallback):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
def test_device_resident_draws(device):
    labels, _ = long_tail_labels()
    on_device = ClassBalancedSampler(labels, seed=1, device=device).indices()
    assert on_device.device.type == device
    assert torch.equal(on_device.cpu(), ClassBalancedSampler(labels, seed=1).indices())


def test_bad_arguments():
    labels, _ = long_tail_labels()
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D"):
        InstanceSampler(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels must hold integers"):
        InstanceSampler(torch.rand(5))
    with pytest.raises(ValueError, match="non-negative"):
        InstanceSampler(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="rank must be an int in"):
        InstanceSampler(labels, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_samples must be an int >= world_size"):
        InstanceSampler(labels, num_samples=1, world_size=2, rank=0)
    with pytest.raises(ValueError, match="num_samples_cls must be a positive int"):
        ClassBalancedSampler(labels, num_samples_cls=0)
    with pytest.raises(ValueError, match="total_epochs must be a positive int"):
        ProgressivelyBalancedSampler(labels, total_epochs=0)
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        InstanceSampler(labels).set_epoch(-1)
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_sampler("balanced", labels)


def test_imagenet_lt_sized_epoch_draws():
    """One ImageNet-LT epoch (115,846 draws over 1000 classes, 5-1280 per class) is drawn whole and
    class-balanced: every class 115 or 116 times (plus the partial group of 4). Timing is in the
    benchmark (benchmarks/throughput.py --suites data), not here."""
    counts = torch.logspace(math.log10(1280), math.log10(5), 1000).floor().long()
    labels = torch.repeat_interleave(torch.arange(1000), counts)
    sampler = ClassBalancedSampler(labels, num_samples_cls=4, num_samples=115_846)
    per_class = torch.bincount(labels[sampler.indices()], minlength=1000)
    assert per_class.sum() == 115_846 and per_class.min() >= 112 and per_class.max() <= 120
