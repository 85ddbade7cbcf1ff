"""The generated demo task (issue 22): deterministic for a seed, balanced and in random
order (the in-order split stays balanced), and solvable only through spatial structure:
colour and brightness statistics of an image say nothing about its class, while its
spatial frequency content does. On a colour-solvable task the demo's search finds an
all-pooling normal cell."""
import numpy as np
import torch

from data import DEMO_CLASSES, make_demo_arrays


def _nearest_class_mean_accuracy(train_features: torch.Tensor, train_labels: list[int],
                                 test_features: torch.Tensor, test_labels: list[int],
                                 standardise: bool) -> float:
    """Accuracy on the test split of the classifier that picks the class whose mean
    training feature vector is nearest (``standardise``: each feature scaled to zero mean
    and unit variance on the training split first)."""
    f, ft = train_features, test_features
    if standardise:
        mu, sd = f.mean(0), f.std(0).clamp(min=1e-8)
        f, ft = (f - mu) / sd, (ft - mu) / sd
    y, yt = torch.tensor(train_labels), torch.tensor(test_labels)
    means = torch.stack([f[y == k].mean(0) for k in range(len(DEMO_CLASSES))])
    return (torch.cdist(ft, means).argmin(1) == yt).float().mean().item()


def _colour_statistics(images: np.ndarray) -> torch.Tensor:
    """Per image: mean and std of each channel and of the brightness (channel mean)."""
    x = torch.from_numpy(images).double() / 255                   # N x H x W x 3
    brightness = x.mean(3)
    return torch.cat([x.mean((1, 2)), x.std((1, 2)),
                      brightness.mean((1, 2))[:, None], brightness.std((1, 2))[:, None]], 1)


def _power_spectrum(images: np.ndarray) -> torch.Tensor:
    """Per image: the square root of its power spectrum summed over channels, as a
    fraction of its total power (mean removed): blind to position, colour and contrast."""
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
    x = x - x.mean((2, 3), keepdim=True)
    p = torch.fft.rfft2(x).abs().pow(2).sum(1)
    return (p / p.sum((1, 2), keepdim=True)).flatten(1).sqrt()


def test_demo_arrays_are_deterministic_balanced_and_shuffled():
    x, y = make_demo_arrays(True)
    assert x.shape == (1000, 32, 32, 3) and x.dtype == np.uint8 and len(y) == 1000
    x2, y2 = make_demo_arrays(True)
    assert np.array_equal(x, x2) and y == y2
    x3, y3 = make_demo_arrays(True, seed=1)
    assert not np.array_equal(x, x3) and y != y3
    xt, yt = make_demo_arrays(False)
    assert xt.shape == (500, 32, 32, 3) and not np.array_equal(x[:500], xt)
    assert np.bincount(y).tolist() == [100] * 10 and np.bincount(yt).tolist() == [50] * 10
    # In random order: each half of the release's in-order split holds every class.
    for half in (y[:500], y[500:]):
        assert np.bincount(half, minlength=10).min() >= 30
    # The images use the range: contrast and colour vary, nothing is flat or saturated.
    assert x.std(axis=(1, 2)).mean() > 10 and 0.05 < (x > 200).mean() + (x < 55).mean() < 0.5


def test_demo_classes_differ_in_structure_not_in_colour():
    x, y = make_demo_arrays(True)
    xt, yt = make_demo_arrays(False)
    # Mean colour, per-channel contrast and brightness statistics: at chance (10%). The
    # earlier, colour-coded demo task scored 89% here.
    colour = _nearest_class_mean_accuracy(_colour_statistics(x), y, _colour_statistics(xt), yt,
                                          standardise=True)
    assert colour < 0.16, colour
    # The spatial frequency content (stripes, checkerboards, rings, outlines): near 100%.
    structure = _nearest_class_mean_accuracy(_power_spectrum(x), y, _power_spectrum(xt), yt,
                                             standardise=False)
    assert structure > 0.9, structure
