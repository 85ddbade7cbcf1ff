"""The device-side CIFAR pipeline (data.augment_batch / DeviceLoader) against the
torchvision transforms: same arithmetic on the same draws, same batches in the same
order as a DataLoader, and the same distribution of random draws."""
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

import data


def _reference(img, offset, flip, centre, mean, std, cutout):
    """The torchvision pipeline (RandomCrop(32, padding=4), flip, ToTensor, Normalize,
    Cutout) with its random draws fixed to the given ones."""
    im = TF.pad(Image.fromarray(img), 4, fill=0)
    im = TF.crop(im, int(offset[0]), int(offset[1]), 32, 32)
    if flip:
        im = TF.hflip(im)
    t = TF.normalize(TF.to_tensor(im), mean, std)
    if cutout:
        cy, cx = int(centre[0]), int(centre[1])
        t[:, max(0, cy - cutout // 2):min(32, cy + cutout // 2),
          max(0, cx - cutout // 2):min(32, cx + cutout // 2)] = 0.0
    return t


@pytest.mark.parametrize("cutout", [0, 16])
def test_augment_batch_matches_torchvision_on_same_draws(cutout):
    x, _ = data.make_demo_arrays(True, num_train=40)
    g = torch.Generator().manual_seed(1)
    B = 40
    offsets = torch.randint(0, 9, (B, 2), generator=g)
    offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])  # the extreme crops
    flips = torch.rand(B, generator=g) < 0.5
    centres = torch.randint(0, 32, (B, 2), generator=g)
    centres[4:6] = torch.tensor([[0, 0], [31, 31]])                 # cutout clipped at borders
    mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    out = data.augment_batch(torch.from_numpy(x), torch.tensor(mean), torch.tensor(std),
                             offsets, flips, centres, padding=4, cutout_length=cutout)
    for b in range(B):
        ref = _reference(x[b], offsets[b], flips[b], centres[b], mean, std, cutout)
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=0)


def test_eval_batch_is_plain_normalisation():
    x, _ = data.make_demo_arrays(False, num_test=8)
    mean, std = data.CIFAR100_MEAN, data.CIFAR100_STD
    out = data.augment_batch(torch.from_numpy(x), torch.tensor(mean), torch.tensor(std))
    ref = torch.stack([data.cifar_transforms("cifar100", train=False)(Image.fromarray(i)) for i in x])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_device_loader_same_batches_and_order_as_dataloader():
    ds = data.get_dataset("demo", "", True, data.cifar_transforms("demo", train=False))
    ds.data, ds.targets = ds.data[:103], ds.targets[:103]        # a tail batch of 3
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(5))
    ref = [t for _, t in DataLoader(ds, batch_size=10, sampler=sampler)]
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(5))
    loader = data.DeviceLoader(ds, 10, sampler, torch.device("cpu"), train=False,
                               mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)
    got = list(loader)
    assert len(loader) == len(got) == 11 and len(got[-1][1]) == 3
    for (_, t), r in zip(got, ref):
        assert torch.equal(t, r)
    # eval batches equal the DataLoader's images exactly
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(5))
    ref_images = torch.cat([i for i, _ in DataLoader(ds, batch_size=10, sampler=sampler)])
    torch.testing.assert_close(torch.cat([i for i, _ in got]), ref_images, atol=1e-6, rtol=0)


def test_device_loader_draw_distribution():
    """Crop offsets uniform on 0..8, flips with probability 1/2, cutout centres uniform:
    the distribution of RandomCrop(32, padding=4), RandomHorizontalFlip and Cutout."""
    ds = data.get_dataset("demo", "", True, None)
    loader = data.DeviceLoader(ds, 100, range(1000), torch.device("cpu"), train=True,
                               mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD, cutout_length=16, seed=3)
    n = 90000
    offsets, flips, centres = loader.draw(n, 32, 32)
    for column in offsets.T:
        freq = torch.bincount(column, minlength=9).float() / n
        assert len(freq) == 9 and (freq - 1 / 9).abs().max() < 0.01
    assert abs(flips.float().mean().item() - 0.5) < 0.01
    for column in centres.T:
        freq = torch.bincount(column, minlength=32).float() / n
        assert len(freq) == 32 and (freq - 1 / 32).abs().max() < 0.005


def test_device_loader_applies_its_draws():
    ds = data.get_dataset("demo", "", True, None)
    mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    loader = data.DeviceLoader(ds, 50, range(50), torch.device("cpu"), train=True,
                               mean=mean, std=std, cutout_length=16, seed=7)
    images, targets = next(iter(loader))
    loader.generator.manual_seed(7)
    offsets, flips, centres = loader.draw(50, 32, 32)
    for b in range(50):
        ref = _reference(ds.data[b], offsets[b], flips[b], centres[b], mean, std, 16)
        torch.testing.assert_close(images[b], ref, atol=1e-6, rtol=0)
    assert targets.tolist() == ds.targets[:50]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_loader_on_cuda_matches_cpu_arithmetic():
    x, _ = data.make_demo_arrays(True, num_train=32)
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 9, (32, 2), generator=g)
    flips = torch.rand(32, generator=g) < 0.5
    centres = torch.randint(0, 32, (32, 2), generator=g)
    mean, std = torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD)
    cpu = data.augment_batch(torch.from_numpy(x), mean, std, offsets, flips, centres, 4, 16)
    gpu = data.augment_batch(torch.from_numpy(x).cuda(), mean.cuda(), std.cuda(), offsets.cuda(),
                             flips.cuda(), centres.cuda(), 4, 16)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=0)
