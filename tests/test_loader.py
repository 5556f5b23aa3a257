"""TensorLoader and the batched augmentation: reproducibility, coverage, crop/flip correctness, normalisation."""
import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import TensorLoader, load_dataset, make_loaders
from kdrun.data.augment import normalize, random_crop, random_hflip

MEAN, STD = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)


def fake_images(n=50, c=3, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8, generator=g)  # 1..255: no zero pixels
    labels = torch.arange(n) % 7
    return images, labels


def loader(images, labels, **kw):
    kw = {"batch_size": 8, "mean": MEAN, "std": STD, "device": "cpu", **kw}
    return TensorLoader(images, labels, **kw)


def epochs(ld, n=2):
    return [[tuple(t.clone() for t in batch) for batch in ld] for _ in range(n)]


def plain(images, index):
    return normalize(images[index], torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))


def test_same_seed_gives_identical_batches_over_two_epochs():
    images, labels = fake_images()
    a = epochs(loader(images, labels, crop_padding=2, hflip=True, seed=3))
    b = epochs(loader(images, labels, crop_padding=2, hflip=True, seed=3))
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b) == 7
        for (xa, ya, ia), (xb, yb, ib) in zip(epoch_a, epoch_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    # the second epoch is a fresh shuffle, not a replay of the first
    assert not torch.equal(torch.cat([i for _, _, i in a[0]]), torch.cat([i for _, _, i in a[1]]))


def test_different_seed_gives_different_order():
    images, labels = fake_images()
    order = [torch.cat([i for _, _, i in loader(images, labels, seed=s)]) for s in (0, 1)]
    assert not torch.equal(order[0], order[1])


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_epoch(drop_last):
    images, labels = fake_images(n=50)
    ld = loader(images, labels, seed=0, drop_last=drop_last, crop_padding=1, hflip=True)
    assert ld.num_samples == 50
    assert len(ld) == (6 if drop_last else 7)
    for _ in range(2):
        batches = list(ld)
        assert len(batches) == len(ld)
        seen = torch.cat([i for _, _, i in batches])
        if drop_last:
            assert len(seen) == 48 and len(set(seen.tolist())) == 48
        else:
            assert sorted(seen.tolist()) == list(range(50))
        for x, y, i in batches:
            assert x.dtype == torch.float32 and x.shape[1:] == images.shape[1:]
            assert torch.equal(y, labels[i])


def naive_crop(image, padding, top, left):
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:, padding:padding + h, padding:padding + w] = image
    return padded[:, top:top + h, left:left + w]


@pytest.mark.parametrize("shape", [(40, 3, 6, 5), (40, 1, 8, 8)])
def test_random_crop_matches_naive_reference(shape):
    n, c, h, w = shape
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    padding = 2
    g = torch.Generator().manual_seed(5)
    replay = torch.Generator()
    replay.set_state(g.get_state())
    out = random_crop(images, padding, g)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    # The offsets random_crop draws: rows then columns, one per image, in [0, 2 * padding].
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=replay)
    assert len(set(map(tuple, offsets.T.tolist()))) > 5  # offsets really vary between images
    for k in range(n):
        top, left = offsets[0, k].item(), offsets[1, k].item()
        assert torch.equal(out[k], naive_crop(images[k], padding, top, left)), k


def test_random_crop_padding_zero_is_identity():
    images, _ = fake_images()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert random_crop(images, 0, g) is images
    assert torch.equal(g.get_state(), state)  # draws nothing


def test_unaugmented_training_batches_are_the_normalised_originals():
    images, labels = fake_images()
    for x, y, i in loader(images, labels, crop_padding=0, hflip=False, seed=2):
        assert torch.allclose(x, plain(images, i))
        assert torch.equal(y, labels[i])


def test_crop_only_shifts_and_zero_pads():
    images, labels = fake_images()  # no zero pixels: zeros in a batch can only be padding
    ld = loader(images, labels, crop_padding=2, hflip=False, seed=2)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    moved = 0
    for x, _, i in ld:
        raw = (x * std + mean) * 255
        assert torch.allclose(raw, raw.round(), atol=1e-3)
        raw = raw.round().to(torch.uint8)
        for k, idx in enumerate(i.tolist()):
            candidates = [naive_crop(images[idx], 2, t, l) for t in range(5) for l in range(5)]
            assert any(torch.equal(raw[k], cand) for cand in candidates)
            moved += not torch.equal(raw[k], images[idx])
    assert moved > 30  # most of the 50 images are shifted (1 in 25 is drawn at the centre)


def test_flips_only_where_enabled_and_about_half():
    images, labels = fake_images(n=2000, h=4, w=4)
    counts = {}
    for hflip in (False, True):
        flipped = 0
        for x, _, i in loader(images, labels, batch_size=256, crop_padding=0, hflip=hflip, seed=4):
            same = (x == plain(images, i)).flatten(1).all(1)
            mirrored = (x == plain(images, i).flip(3)).flatten(1).all(1)
            assert bool((same | mirrored).all())  # each image is either itself or its mirror
            assert not bool((same & mirrored).any())  # random images are never symmetric
            flipped += int(mirrored.sum())
        counts[hflip] = flipped
    assert counts[False] == 0
    assert 900 < counts[True] < 1100  # binomial(2000, 0.5): sd ~22


def test_random_hflip_keeps_dtype_and_shape():
    images, _ = fake_images()
    out = random_hflip(images, torch.Generator().manual_seed(0))
    assert out.dtype == images.dtype and out.shape == images.shape


def test_test_loader_is_ordered_and_unaugmented():
    images, labels = fake_images()
    ld = loader(images, labels, train=False, crop_padding=4, hflip=True, seed=9)
    for _ in range(2):
        batches = list(ld)
        assert torch.equal(torch.cat([i for _, _, i in batches]), torch.arange(50))
        assert torch.allclose(torch.cat([x for x, _, _ in batches]), plain(images, torch.arange(50)))
        assert torch.equal(torch.cat([y for _, y, _ in batches]), labels)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(OmegaConf.create({"name": "digits", "root": None}))


def test_digits_normalisation_gives_zero_mean_unit_std(digits):
    train, test = make_loaders(digits, batch_size=4096, device="cpu", seed=0)
    train.crop_padding = 0  # the statistics are of the un-augmented training images
    x = torch.cat([b[0] for b in train])
    assert x.shape[0] == len(digits.train_labels)
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1) < 1e-3


def test_make_loaders_for_digits(digits):
    train, test = make_loaders(digits, batch_size=64, device="cpu", seed=0, eval_batch_size=100)
    assert train.num_samples + test.num_samples == 1797
    assert len(train) == -(-train.num_samples // 64) and len(test) == -(-test.num_samples // 100)
    x, y, i = next(iter(train))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.int64 and i.dtype == torch.int64
    assert train.crop_padding == 1 and not train.hflip and test.crop_padding == 0
