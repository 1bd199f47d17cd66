"""Tests for pytest_ampgate.data and builtin_data: synthetic data, device batches, user tensors and real-file loading.

The real-file tests write tiny datasets in the genuine on-disk formats (MNIST idx files, CIFAR-10
pickled batches) and load them through torchvision, so the path that reads a user's real data is
exercised without any download: a fixture makes every torchvision download helper fail the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_ampgate import builtin_data as data
from pytest_ampgate.builtin_data import load_cifar10, load_mnist
from pytest_ampgate.data import DeviceDataset, from_tensors, synthetic
from pytest_ampgate.errors import AmpGateError, ConfigError, DataError, WorkloadError

# ---------------------------------------------------------------------------------------------
# helpers


def load_builtin(name, root=None, **kwargs):
    """A built-in dataset by name ("mnist" or "cifar10"; case, "-" and "_" ignored), as these tests pick one."""
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10}
    loader = loaders.get(str(name).lower().replace("-", "").replace("_", ""))
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; built-in datasets are: {', '.join(sorted(loaders))}")
    return loader(root, **kwargs)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to download (torchvision's helpers or raw urllib)."""
    import urllib.request

    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.utils as tv_utils

    def forbidden(*args, **kwargs):
        pytest.fail(f"network access attempted: {args!r}")

    for module, attr in (
        (tv_mnist, "download_and_extract_archive"),
        (tv_cifar, "download_and_extract_archive"),
        (tv_utils, "download_and_extract_archive"),
        (tv_utils, "download_url"),
        (tv_utils, "_urlretrieve"),
        (urllib.request, "urlopen"),
    ):
        monkeypatch.setattr(module, attr, forbidden)


def _idx(path, magic, dims, payload: bytes):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for d in dims:
            f.write(struct.pack(">I", d))
        f.write(payload)


def _tagged_images(n, shape, seed):
    """uint8 images whose first pixel is the image's index, so a shuffled copy can be matched back."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    x.view(n, -1)[:, 0] = torch.arange(n, dtype=torch.uint8)
    return x


def write_mnist(root, n_train=30, n_test=12):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x = _tagged_images(n, (28, 28), seed)
        y = torch.arange(n, dtype=torch.uint8) % 10
        _idx(raw / f"{prefix}-images-idx3-ubyte", 2051, (n, 28, 28), x.numpy().tobytes())
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, (n,), y.numpy().tobytes())
        out[prefix] = (x, y.long())
    return raw, out


def write_cifar(root, per_batch=4, n_test=6):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    n_train = 5 * per_batch
    xtr = _tagged_images(n_train, (3, 32, 32), 3)
    ytr = (torch.arange(n_train) * 3) % 10
    xte = _tagged_images(n_test, (3, 32, 32), 4)
    yte = torch.arange(n_test) % 10

    def dump(name, obj):
        # Real CIFAR files are Python-2 pickles whose str keys torchvision reads back as str
        # ("data", "labels") with encoding="latin1"; str keys here give the same dict.
        with open(base / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        dump(f"data_batch_{i + 1}", {"data": xtr[sl].reshape(per_batch, 3072).numpy(), "labels": ytr[sl].tolist()})
    dump("test_batch", {"data": xte.reshape(n_test, 3072).numpy(), "labels": yte.tolist()})
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return base, (xtr, ytr, xte, yte)


def patch_cifar_md5s(monkeypatch, base):
    """Point torchvision's CIFAR10 checksums at the files this test wrote (the library stays strict)."""
    import torchvision.datasets as tvd

    def md5(name):
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    cls = tvd.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def match_back(loaded_x, mean, std):
    """Indices into expected_x of each loaded sample, read from the tagged first pixel."""
    first = loaded_x.reshape(loaded_x.shape[0], -1)[:, 0]
    return torch.round((first * std[0] + mean[0]) * 255).long()


def normalised(u8, mean, std):
    c = u8.shape[1]
    m = torch.tensor(mean).view(1, c, 1, 1)
    s = torch.tensor(std).view(1, c, 1, 1)
    return (u8.float() / 255 - m) / s


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_same_seed_bit_identical_regardless_of_global_rng():
    torch.manual_seed(123)
    a = synthetic("s", (1, 28, 28), 10, n_train=300, n_test=50, seed=7)
    torch.manual_seed(999)
    torch.rand(1000)
    b = synthetic("s", (1, 28, 28), 10, n_train=300, n_test=50, seed=7)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    c = synthetic("s", (1, 28, 28), 10, n_train=300, n_test=50, seed=8)
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.test_x, c.test_x)


def test_synthetic_shapes_dtypes_balance_and_stats():
    ds = synthetic("cifar-like", (3, 32, 32), 10, n_train=1000, n_test=205, seed=0)
    assert ds.source == "synthetic"
    assert ds.train_x.shape == (1000, 3, 32, 32) and ds.test_x.shape == (205, 3, 32, 32)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.test_y.dtype == torch.int64
    assert ds.sample_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.device == torch.device("cpu")
    for y in (ds.train_y, ds.test_y):
        counts = torch.bincount(y, minlength=10)
        assert counts.numel() == 10 and int(counts.max() - counts.min()) <= 1
    assert abs(float(ds.train_x.mean())) < 0.05
    assert 0.9 < float(ds.train_x.std()) < 1.1
    assert abs(float(ds.test_x.mean())) < 0.05
    assert 0.9 < float(ds.test_x.std()) < 1.1
    # labels are not in class order (contiguous batches must be mixed)
    assert len(set(ds.train_y[:20].tolist())) >= 5


def test_synthetic_test_set_does_not_depend_on_n_train():
    a = synthetic("s", (1, 28, 28), 10, n_train=100, n_test=40, seed=3)
    b = synthetic("s", (1, 28, 28), 10, n_train=250, n_test=40, seed=3)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)


@pytest.mark.parametrize("shape", [(20,), (12, 16), (2, 3, 10, 10)])
def test_synthetic_other_sample_shapes(shape):
    ds = synthetic("odd", shape, 3, n_train=30, n_test=9, seed=0)
    assert ds.sample_shape == shape
    assert ds.train_x.shape == (30, *shape) and ds.test_x.shape == (9, *shape)
    assert torch.isfinite(ds.train_x).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_shape=(), num_classes=10, n_train=10, n_test=10), "sample_shape"),
        (dict(sample_shape=(1, 0, 4), num_classes=10, n_train=10, n_test=10), "sample_shape"),
        (dict(sample_shape=(4,), num_classes=1, n_train=10, n_test=10), "num_classes"),
        (dict(sample_shape=(4,), num_classes=3, n_train=0, n_test=10), "n_train"),
        (dict(sample_shape=(4,), num_classes=3, n_train=10, n_test=2.5), "n_test"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        synthetic("bad", **kwargs)


def _train_eval(model, ds, steps, batch_size, lr, momentum=0.0):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for step in range(steps):
        x, y = ds.batch(step, batch_size)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    correct = 0
    with torch.no_grad():
        for x, y in ds.test_batches(500):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / ds.n_test


def test_synthetic_mnist_shape_is_learnable_by_reference_mlp_but_not_by_one_pixel():
    ds = synthetic("mnist", (1, 28, 28), 10, n_train=2048, n_test=1000, seed=0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    # the product's reference settings: SGD lr 0.01, batch 64, a few hundred steps
    acc = _train_eval(mlp, ds, steps=300, batch_size=64, lr=0.01)
    assert acc > 0.6, acc

    # ...while the best single pixel, used as a nearest-class-mean classifier, is near chance:
    # the noise matters, so broken numerics would show up in the accuracy.
    x = ds.train_x[:1000].flatten(1)
    y = ds.train_y[:1000]
    means = torch.stack([x[y == k].mean(0) for k in range(10)])  # (10, 784)
    pred = (x[:, None, :] - means[None]).abs().argmin(1)  # (1000, 784): per-pixel prediction
    best_pixel_acc = float((pred == y[:, None]).float().mean(0).max())
    assert best_pixel_acc < 0.35, best_pixel_acc


def test_synthetic_image_shape_is_learnable_by_small_cnn():
    ds = synthetic("img", (3, 16, 16), 10, n_train=1024, n_test=500, seed=1)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    acc = _train_eval(cnn, ds, steps=150, batch_size=64, lr=0.01, momentum=0.9)
    assert acc > 0.6, acc


# ---------------------------------------------------------------------------------------------
# DeviceDataset


@pytest.fixture
def small():
    return synthetic("small", (1, 4, 4), 3, n_train=10, n_test=7, seed=0)


def test_batch_is_a_view_of_the_resident_tensor(small):
    x, y = small.batch(1, 4)
    for part, whole in ((x, small.train_x), (y, small.train_y)):
        assert part._is_view()
        assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        assert part.data_ptr() == whole.data_ptr() + 4 * whole.stride(0) * whole.element_size()
    assert torch.equal(x, small.train_x[4:8]) and torch.equal(y, small.train_y[4:8])


def test_batch_wraps_deterministically_and_is_always_full_size(small):
    n, bs = 10, 4
    for step in range(40):
        x, y = small.batch(step, bs)
        start = (step * bs) % (n - bs + 1)
        assert x.shape == (bs, 1, 4, 4) and y.shape == (bs,)
        assert torch.equal(x, small.train_x[start : start + bs])
    # same step -> same samples; a full-set batch is the whole set
    assert torch.equal(small.batch(13, 4)[0], small.batch(13, 4)[0])
    assert torch.equal(small.batch(5, 10)[0], small.train_x)
    # a contiguous walk covers every sample within a few wraps
    seen = set()
    for step in range(10):
        start = (step * bs) % (n - bs + 1)
        seen.update(range(start, start + bs))
    assert seen == set(range(n))


@pytest.mark.parametrize("bs", [0, -1, 11, 2.0, "4"])
def test_bad_batch_sizes_raise(small, bs):
    with pytest.raises(WorkloadError, match="batch"):
        small.batch(0, bs)


def test_negative_step_raises(small):
    with pytest.raises(WorkloadError, match="step"):
        small.batch(-1, 2)


def test_test_batches_cover_the_held_out_set_in_order(small):
    parts = list(small.test_batches(3))
    assert [x.shape[0] for x, _ in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([x for x, _ in parts]), small.test_x)
    assert torch.equal(torch.cat([y for _, y in parts]), small.test_y)
    assert all(x.untyped_storage().data_ptr() == small.test_x.untyped_storage().data_ptr() for x, _ in parts)
    assert [x.shape[0] for x, _ in small.test_batches(100)] == [7]
    with pytest.raises(WorkloadError):
        small.test_batches(0)


def test_to_and_describe(small):
    moved = small.to("cpu")
    assert isinstance(moved, DeviceDataset) and moved.device == torch.device("cpu")
    assert torch.equal(moved.train_x, small.train_x) and moved.name == small.name
    d = small.describe()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "name": "small",
        "source": "synthetic",
        "n_train": 10,
        "n_test": 7,
        "sample_shape": [1, 4, 4],
        "num_classes": 3,
        "root": None,
        "note": small.note,
    }
    assert "small" in repr(small) and "tensor(" not in repr(small)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_residency_views_and_device_independent_values():
    cpu = synthetic("s", (1, 28, 28), 10, n_train=256, n_test=64, seed=2)
    gpu = synthetic("s", (1, 28, 28), 10, n_train=256, n_test=64, seed=2, device="cuda")
    assert gpu.device.type == "cuda" and gpu.train_y.device.type == "cuda"
    assert torch.equal(gpu.train_x.cpu(), cpu.train_x) and torch.equal(gpu.test_y.cpu(), cpu.test_y)
    x, _y = gpu.batch(3, 64)
    assert x.is_cuda and x.untyped_storage().data_ptr() == gpu.train_x.untyped_storage().data_ptr()
    back = gpu.to("cpu")
    assert back.device == torch.device("cpu") and torch.equal(back.train_x, cpu.train_x)


def test_direct_construction_checks_split_lengths():
    with pytest.raises(WorkloadError, match="train_y has 3 labels but train_x has 4 samples"):
        DeviceDataset(
            "d",
            "user",
            torch.zeros(4, 2),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(2, 2),
            torch.zeros(2, dtype=torch.long),
            num_classes=2,
        )


# ---------------------------------------------------------------------------------------------
# from_tensors


def _user(**overrides):
    t = dict(
        train_x=torch.randn(12, 5),
        train_y=torch.arange(12) % 3,
        test_x=torch.randn(4, 5),
        test_y=torch.tensor([0, 1, 2, 0]),
    )
    t.update(overrides)
    return t


def test_from_tensors_accepts_good_data_without_normalising():
    t = _user(train_x=torch.randn(12, 5, dtype=torch.float64) * 7 + 3)
    ds = from_tensors("mine", **t)
    assert ds.source == "user" and ds.num_classes == 3 and ds.sample_shape == (5,)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    torch.testing.assert_close(ds.train_x, t["train_x"].float())  # not normalised
    assert from_tensors("mine", **t, num_classes=5).num_classes == 5
    i32 = from_tensors("mine", **_user(train_y=(torch.arange(12) % 3).int()))
    assert i32.train_y.dtype == torch.int64


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        (dict(train_y=torch.arange(10) % 3), {}, "train_y has 10 labels but train_x has 12 samples"),
        (dict(test_y=torch.tensor([0, 1, 2])), {}, "test_y has 3 labels but test_x has 4 samples"),
        (dict(train_y=(torch.arange(12) % 3).float()), {}, r"train_y is floating but the other split's targets are integers"),
        (dict(train_y=torch.zeros(12, 3, dtype=torch.long)), {}, r"test_y has shape \(4\) but train_y has shape \(12, 3\)"),
        (dict(train_y=torch.zeros(12, dtype=torch.bool)), {}, r"train_y has dtype torch.bool; expected integer class labels"),
        (
            dict(train_x=torch.randint(0, 255, (12, 5), dtype=torch.uint8)),
            {},
            r"train_x has dtype torch.uint8 and shape \(12, 5\); inputs must be floating .* or integer ids \(int64, int32\): for uint8 images",
        ),
        (dict(train_x=torch.randn(12)), {}, r"train_x has shape \(12\).*\(N, \*sample_shape\)"),
        (dict(test_x=torch.randn(4, 6)), {}, r"test_x has shape \(4, 6\) but train_x has shape \(12, 5\)"),
        (dict(test_y=torch.tensor([0, 1, 5, 0])), dict(num_classes=3), r"test_y holds label 5 but num_classes=3"),
        (dict(train_y=torch.arange(12) % 3 - 1), {}, r"train_y holds label -1"),
        (dict(train_x=torch.full((12, 5), float("nan"))), {}, r"train_x contains NaN or inf"),
        (dict(train_y=[0] * 12), {}, r"train_y must be a torch.Tensor, got list"),
        (dict(train_y=torch.zeros(12, dtype=torch.long), test_y=torch.zeros(4, dtype=torch.long)), {}, "num_classes"),
    ],
)
def test_from_tensors_validation_names_the_tensor(overrides, kwargs, message):
    with pytest.raises(WorkloadError, match=message):
        from_tensors("mine", **_user(**overrides), **kwargs)


# ---------------------------------------------------------------------------------------------
# built-in loaders: no root, missing root, empty root


def test_no_root_gives_synthetic_stand_ins_of_the_right_shapes(no_network):
    m = load_mnist(None, n_train=64, n_test=16)
    assert m.source == "synthetic" and m.name == "mnist" and m.root is None
    assert m.sample_shape == (1, 28, 28) and m.num_classes == 10
    assert m.n_train == 64 and m.n_test == 16 and "no data root" in m.note
    c = load_builtin("CIFAR-10", n_train=32, n_test=8, seed=1)
    assert c.source == "synthetic" and c.name == "cifar10" and c.sample_shape == (3, 32, 32)
    # deterministic in the seed
    assert torch.equal(load_mnist(n_train=64, n_test=16).train_x, m.train_x)


def test_synthetic_defaults_are_the_documented_sizes(no_network):
    ds = load_mnist()
    assert (ds.n_train, ds.n_test) == (data.SYNTHETIC_N_TRAIN, data.SYNTHETIC_N_TEST) == (20000, 2000)


def test_missing_root_directory_is_an_error_naming_it(tmp_path, no_network):
    missing = tmp_path / "nope"
    for loader in (load_mnist, load_cifar10):
        with pytest.raises(DataError) as info:
            loader(missing)
        msg = str(info.value)
        assert str(missing) in msg and "download=True" in msg and "--ampgate-data-root" in msg
    assert not missing.exists()


def test_root_that_is_a_file_is_an_error(tmp_path, no_network):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_mnist(f)


def test_empty_root_falls_back_to_synthetic_with_a_note_naming_the_expected_file(tmp_path, no_network):
    m = load_mnist(tmp_path, n_train=40, n_test=10)
    assert m.source == "synthetic" and m.root == str(tmp_path) and m.sample_shape == (1, 28, 28)
    assert f"no MNIST files under {tmp_path}" in m.note
    assert os.path.join(str(tmp_path), "MNIST", "raw", "train-images-idx3-ubyte") in m.note
    c = load_cifar10(str(tmp_path), n_train=40, n_test=10)
    assert c.source == "synthetic" and "no CIFAR-10 files" in c.note
    assert os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1") in c.note
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'.*cifar10, mnist"):
        load_builtin("imagenet")


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="n_train"):
        load_mnist(n_train=0)
    with pytest.raises(ConfigError, match="n_test"):
        load_cifar10(n_test=-3)
    assert issubclass(ConfigError, AmpGateError) and issubclass(DataError, AmpGateError)


def test_download_true_without_root_is_an_error():
    with pytest.raises(DataError, match="needs a data root"):
        load_mnist(download=True)


def test_download_only_when_asked(tmp_path, monkeypatch):
    """download=True goes through torchvision's downloader; its failure is reported with the path."""
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist

    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        raise URLError("offline")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    load_mnist(tmp_path, n_train=8, n_test=8)  # download=False: synthetic, no call
    assert calls == []
    with pytest.raises(DataError, match="could not download MNIST into") as info:
        load_mnist(tmp_path / "new", download=True)
    assert calls and str(tmp_path / "new") in str(info.value)


# ---------------------------------------------------------------------------------------------
# real MNIST files


def test_loads_real_mnist_idx_files(tmp_path, no_network):
    _, written = write_mnist(tmp_path)
    ds = load_mnist(tmp_path, seed=5)
    assert ds.source == "torchvision-files" and ds.name == "mnist" and ds.root == str(tmp_path)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    xtr, ytr = written["train"]
    xte, yte = written["t10k"]
    mean, std = (0.1307,), (0.3081,)
    # train: a shuffled permutation of the written images, pixels normalised as documented
    idx = match_back(ds.train_x, mean, std)
    assert sorted(idx.tolist()) == list(range(30))
    assert idx.tolist() != list(range(30))  # shuffled once at load
    torch.testing.assert_close(ds.train_x, normalised(xtr[idx].unsqueeze(1), mean, std), rtol=0, atol=1e-6)
    assert torch.equal(ds.train_y, ytr[idx])
    # test: file order
    torch.testing.assert_close(ds.test_x, normalised(xte.unsqueeze(1), mean, std), rtol=0, atol=1e-6)
    assert torch.equal(ds.test_y, yte)
    # same seed -> same order; other seed -> other order; n_train is a prefix of the shuffle
    assert torch.equal(load_mnist(tmp_path, seed=5).train_y, ds.train_y)
    assert not torch.equal(load_mnist(tmp_path, seed=6).train_x, ds.train_x)
    sub = load_mnist(tmp_path, seed=5, n_train=10, n_test=4)
    assert torch.equal(sub.train_x, ds.train_x[:10]) and torch.equal(sub.test_x, ds.test_x[:4])
    with pytest.raises(DataError, match="n_train=31 but MNIST .* holds only 30"):
        load_mnist(tmp_path, n_train=31)


def test_truncated_mnist_file_is_an_error_naming_it(tmp_path, no_network):
    raw, _ = write_mnist(tmp_path)
    victim = raw / "t10k-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:-500])
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    msg = str(info.value)
    assert str(victim) in msg and "truncated" in msg and "download" in msg


def test_mnist_file_with_wrong_magic_is_an_error_naming_it(tmp_path, no_network):
    raw, _ = write_mnist(tmp_path)
    victim = raw / "train-labels-idx1-ubyte"
    victim.write_bytes(b"\x00\x00\x08\x03" + victim.read_bytes()[4:])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*magic number 2051, expected 2049"):
        load_mnist(tmp_path)


def test_incomplete_or_misplaced_mnist_is_an_error_not_a_fallback(tmp_path, no_network):
    raw, _ = write_mnist(tmp_path / "a")
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete: t10k-labels-idx1-ubyte missing"):
        load_mnist(tmp_path / "a")
    # root pointed one level too deep (at .../MNIST instead of its parent)
    write_mnist(tmp_path / "b")
    with pytest.raises(DataError, match="contains MNIST/raw"):
        load_mnist(tmp_path / "b" / "MNIST")


# ---------------------------------------------------------------------------------------------
# real CIFAR-10 files


def test_loads_real_cifar10_batches(tmp_path, monkeypatch, no_network):
    base, (xtr, ytr, xte, yte) = write_cifar(tmp_path)
    patch_cifar_md5s(monkeypatch, base)
    ds = load_cifar10(tmp_path, seed=2)
    assert ds.source == "torchvision-files" and ds.name == "cifar10" and ds.root == str(tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert ds.train_x.is_contiguous() and ds.test_x.is_contiguous()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    idx = match_back(ds.train_x, mean, std)  # first pixel is channel 0
    assert sorted(idx.tolist()) == list(range(20)) and idx.tolist() != list(range(20))
    torch.testing.assert_close(ds.train_x, normalised(xtr[idx], mean, std), rtol=0, atol=1e-6)
    assert torch.equal(ds.train_y, ytr[idx])
    torch.testing.assert_close(ds.test_x, normalised(xte, mean, std), rtol=0, atol=1e-6)
    assert torch.equal(ds.test_y, yte)
    assert load_builtin("cifar10", tmp_path, seed=2, n_train=5).n_train == 5


def test_corrupt_cifar10_file_is_an_error_naming_it(tmp_path, monkeypatch, no_network):
    base, _ = write_cifar(tmp_path)
    patch_cifar_md5s(monkeypatch, base)
    victim = base / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated after the checksums were recorded
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    msg = str(info.value)
    assert str(victim) in msg and "corrupt or truncated" in msg and "download" in msg


def test_cifar10_with_unpatched_checksums_is_rejected_not_replaced(tmp_path, no_network):
    """The library keeps torchvision's md5 check: files that fail it never load, nor fall back."""
    write_cifar(tmp_path)
    with pytest.raises(DataError, match="data_batch_1 is corrupt or truncated"):
        load_cifar10(tmp_path)


def test_incomplete_cifar10_is_an_error(tmp_path, no_network):
    base, _ = write_cifar(tmp_path)
    (base / "test_batch").unlink()
    with pytest.raises(DataError, match="incomplete: test_batch missing"):
        load_cifar10(tmp_path)
