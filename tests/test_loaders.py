"""The device-resident loader for in-memory datasets (ltfast.data.loaders.DeviceTensorLoader)."""
import pytest
import torch

from conftest import device_params
from ltfast.data import ClassBalancedSampler, DeviceTensorLoader, InMemoryDataset, InstanceSampler


def toy_dataset(n=50, channels=1, size=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, *size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return InMemoryDataset(images, labels)


def normalise(images, mean, std):
    return (images.float() / 255 - mean) / std


@pytest.mark.parametrize("device", device_params())
def test_training_batches_follow_the_sampler(device):
    ds = toy_dataset()
    sampler = ClassBalancedSampler(ds.labels, num_samples_cls=2, seed=3)
    loader = DeviceTensorLoader(ds, sampler, batch_size=8, device=device, pad=0, flip=False, mean=(0.5,), std=(0.25,))
    assert len(loader) == 50 // 8
    indices = sampler.indices()
    for b, (x, y) in enumerate(loader):
        expected_indices = indices[b * 8:(b + 1) * 8]
        assert x.device.type == device and x.dtype == torch.float32 and x.shape == (8, 1, 6, 5)
        assert y.dtype == torch.int64 and torch.equal(y.cpu(), ds.labels[expected_indices])
        torch.testing.assert_close(x.cpu(), normalise(ds.images[expected_indices], 0.5, 0.25))


@pytest.mark.parametrize("device", device_params())
def test_augmentation_is_a_padded_crop_and_flip(device):
    ds = toy_dataset(n=20, channels=3)
    sampler = InstanceSampler(ds.labels, seed=1)
    loader = DeviceTensorLoader(ds, sampler, batch_size=20, device=device, pad=2, mean=(0.0,), std=(1.0,))
    x, _ = next(iter(loader))
    x = (x.cpu() * 255).round()
    padded = torch.nn.functional.pad(ds.images[sampler.indices()].float(), (2, 2, 2, 2))
    flips_seen = set()
    for i in range(20):
        candidates = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                      if torch.equal(x[i], (lambda crop: crop.flip(-1) if flip else crop)(padded[i, :, top:top + 6, left:left + 5]))]
        assert candidates, f"image {i} is not a crop/flip of its padded source"
        flips_seen.update(flip for _, _, flip in candidates)
    assert flips_seen == {False, True}


def test_epochs_are_reproducible_and_differ():
    ds = toy_dataset()
    loader = DeviceTensorLoader(ds, InstanceSampler(ds.labels, seed=2), batch_size=10, seed=5)
    loader.set_epoch(3)
    first = [x for x, _ in loader]
    loader.set_epoch(1)
    other = [x for x, _ in loader]
    loader.set_epoch(3)
    again = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert loader.sampler.epoch == 3


@pytest.mark.parametrize("world_size", [1, 3])
def test_evaluation_shards_cover_every_image_once(world_size):
    ds = toy_dataset(n=47)
    seen = []
    for rank in range(world_size):
        loader = DeviceTensorLoader(ds, None, batch_size=4, train=False, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.append(torch.cat([y for _, y in batches]))
        x, _ = batches[0]
        torch.testing.assert_close(x, normalise(ds.images[torch.arange(rank, 47, world_size)[:4]], 0.2860, 0.3530))
    assert sum(s.numel() for s in seen) == 47


def test_bfloat16_and_drop_last():
    ds = toy_dataset(n=50)
    loader = DeviceTensorLoader(ds, InstanceSampler(ds.labels), batch_size=16, dtype=torch.bfloat16, drop_last=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and batches[-1][0].shape[0] == 2 and batches[0][0].dtype == torch.bfloat16


def test_bad_arguments():
    ds = toy_dataset()
    with pytest.raises(TypeError, match="dataset must be an ltfast.data.InMemoryDataset"):
        DeviceTensorLoader(torch.zeros(3), InstanceSampler(ds.labels))
    with pytest.raises(ValueError, match="sampler is required when train=True"):
        DeviceTensorLoader(ds, None)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        DeviceTensorLoader(ds, InstanceSampler(ds.labels), batch_size=0)
    with pytest.raises(ValueError, match="mean and std must have 1 or 1"):
        DeviceTensorLoader(ds, InstanceSampler(ds.labels), mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="std must be positive"):
        DeviceTensorLoader(ds, InstanceSampler(ds.labels), std=(0.0,))
