"""Issue 13 §1.3 and §1.9: samplers shard from torchrun's environment before init_process_group,
take numpy ints, and do not build a table as large as the largest label; the sampling ops' bounds
check does not overflow; the reference / fallback LADE and SEQL edge cases."""
import resource

import numpy as np
import pytest
import torch

import ltfast
from ltfast import _extension, reference
from ltfast.data import ClassBalancedSampler, InstanceSampler, SquareRootSampler, ProgressivelyBalancedSampler

LABELS = torch.tensor([0] * 12 + [1] * 6 + [2] * 2)


def test_samplers_shard_from_torchrun_environment(monkeypatch):
    # torchrun sets RANK / WORLD_SIZE; a sampler built before init_process_group used to be rank 0 of 1.
    streams = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        sampler = ClassBalancedSampler(LABELS, seed=3)
        assert (sampler.rank, sampler.world_size) == (rank, 2)
        streams.append(sampler.indices())
    assert len(streams[0]) == len(streams[1]) == 10
    assert not torch.equal(streams[0], streams[1])


def test_bad_torchrun_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        InstanceSampler(LABELS)


def test_samplers_take_numpy_ints():
    sampler = ClassBalancedSampler(LABELS, num_samples_cls=np.int64(4), seed=np.int64(1), num_samples=np.int32(16),
                                   rank=np.int64(0), world_size=np.int64(1))
    sampler.set_epoch(np.int64(2))
    assert sampler.epoch == 2 and len(sampler.indices()) == 16
    ProgressivelyBalancedSampler(LABELS, total_epochs=np.int64(5))
    with pytest.raises(TypeError, match="seed must be an int"):
        InstanceSampler(LABELS, seed=1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        InstanceSampler(LABELS, seed=True)


def test_sampler_with_a_huge_label_builds_no_huge_table():
    # A label of 10**9 made ClassBalancedSampler take 35 s and 17 GB (a bincount of 10**9 entries).
    labels = torch.tensor([0, 1, 10**9, 10**9])
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for cls in (ClassBalancedSampler, SquareRootSampler):
        sampler = cls(labels, seed=0)
        assert sorted(sampler.indices().tolist()) != [] and sampler.present_classes.tolist() == [0, 1, 10**9]
    # checked by memory, not by a clock (a loaded machine stretches time): the table was 8 GB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 1024 * 1024


def _table():
    return torch.tensor([0, 2, 4]), torch.arange(4)


@pytest.mark.skipif(not _extension.AVAILABLE, reason="needs ltfast._C")
def test_class_aware_sample_bounds_check_does_not_overflow():
    offsets, members = _table()
    with pytest.raises(ValueError, match=r"start \+ count .* must not exceed epoch_length"):
        torch.ops.ltfast.class_aware_sample(offsets, members, 0, 0, 2**63 - 5, 10, 1, 100)
    with pytest.raises(ValueError, match=r"must not exceed epoch_length"):
        torch.ops.ltfast.class_weighted_sample(torch.tensor([0.5, 1.0], dtype=torch.float64), offsets, members,
                                               0, 0, 2**63 - 5, 10, 100)


def test_reference_sampling_checks_its_range():
    offsets, members = _table()
    with pytest.raises(ValueError, match=r"must not exceed epoch_length"):
        reference.class_aware_sample(offsets, members, 0, 0, 2**63 - 5, 10, 1, 100)


@pytest.mark.parametrize("rows", ["empty", "all_ignored"])
@pytest.mark.parametrize("fallback", [False, True])
def test_lade_without_rows_is_nan(monkeypatch, rows, fallback):
    # The reference (and the fallback, which is the reference) raised "math domain error"; the op gives NaN.
    if fallback:
        monkeypatch.setattr(_extension, "AVAILABLE", False)
    elif not _extension.AVAILABLE:
        pytest.skip("needs ltfast._C")
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    logits = torch.randn(0 if rows == "empty" else 4, 3)
    target = torch.full((logits.shape[0],), -100)
    assert torch.isnan(ltfast.lade_loss(logits, target, log_prior))
    assert torch.isnan(reference.lade(logits, target, log_prior))


def test_reference_seql_honours_seed():
    x, t = torch.randn(16, 6), torch.arange(16) % 6
    mask = torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)
    seed = torch.tensor([11, 12])
    torch.manual_seed(0)
    first = reference.softmax_equalization_loss(x, t, mask, 0.5, seed=seed)
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(first, reference.softmax_equalization_loss(x, t, mask, 0.5, seed=seed))
    assert not torch.equal(first, reference.softmax_equalization_loss(x, t, mask, 0.5, seed=torch.tensor([11, 13])))


def test_fallback_seql_honours_seed(monkeypatch):
    monkeypatch.setattr(_extension, "AVAILABLE", False)
    x, t = torch.randn(16, 6), torch.arange(16) % 6
    mask = torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)
    seed = torch.tensor([11, 12])
    torch.manual_seed(0)
    first = ltfast.softmax_equalization_loss(x, t, mask, 0.5, seed=seed)
    torch.manual_seed(1)
    assert torch.equal(first, ltfast.softmax_equalization_loss(x, t, mask, 0.5, seed=seed))


@pytest.mark.parametrize("value", [2, 255])
def test_uint8_tail_mask_is_a_flag_in_the_reference_as_in_the_op(value):
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.arange(8) % 5
    flags = torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)
    odd = torch.tensor([0, 0, value, 1, value], dtype=torch.uint8)
    torch.testing.assert_close(reference.equalization_loss(x, t, odd), reference.equalization_loss(x, t, flags))
    keep = torch.rand(8, 5) > 0.5
    torch.testing.assert_close(reference.softmax_equalization_loss(x, t, odd, keep=keep),
                               reference.softmax_equalization_loss(x, t, flags, keep=keep))
    if _extension.AVAILABLE:
        torch.testing.assert_close(ltfast.equalization_loss(x, t, odd), reference.equalization_loss(x, t, flags))
