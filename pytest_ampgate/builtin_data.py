"""The built-in datasets, MNIST and CIFAR-10: real files from a local root, else a synthetic stand-in.

Real files are read through ``torchvision.datasets`` (their ``.data``/``.targets`` arrays go
straight into tensors: no PIL round trip), normalised once, shuffled once and moved to the device
as a :class:`~pytest_ampgate.data.DeviceDataset`. Nothing is ever downloaded unless
``download=True`` is passed. With no root, or a root without the files, the dataset is the
deterministic synthetic set of the same shape, and its ``note`` says why.

Missing data falls back to synthetic data; data that is present but broken never does: a corrupt,
truncated, incomplete, still-compressed or misplaced file is a :class:`~pytest_ampgate.errors.DataError`
that names the file and the fix, because silently swapping real data for synthetic would change
every accuracy number without a word. Both datasets go through the same checks; what differs
between them (file names, how one file is verified, where torchvision expects them) is data in
a :class:`_Spec`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from .data import SYNTHETIC_NOISE, DeviceDataset, DeviceLike, positive_int, synthetic
from .errors import DataError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "MNIST_MEAN", "MNIST_STD", "SYNTHETIC_N_TEST", "SYNTHETIC_N_TRAIN", "load_cifar10", "load_mnist"]

#: Synthetic stand-ins are kept modest (not 60000/50000 like the real sets): big enough for a few
#: hundred distinct batches and a stable accuracy estimate, small enough to generate in about a
#: second and to sit on any GPU next to the model.
SYNTHETIC_N_TRAIN = 20000
SYNTHETIC_N_TEST = 2000

# The usual torchvision normalisation constants (training-set mean/std of the pixel values / 255).
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_NUM_CLASSES = 10
_IDX_IMAGES, _IDX_LABELS = 2051, 2049
"""The idx magic numbers of MNIST's image and label files."""


@dataclass(frozen=True)
class _Spec:
    """What differs between the built-in datasets; every step of loading and checking is shared."""

    key: str
    label: str
    tv_class: str
    """The ``torchvision.datasets`` class that reads the files."""
    folder: str
    """The dataset's directory under the root."""
    files_dir: tuple[str, ...]
    """Where torchvision expects the files, under the root."""
    file_shape: tuple[int, ...]
    """One image as torchvision stores it (MNIST HW, CIFAR-10 HWC)."""
    sample_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stand_in_noise: float
    """Per-pixel noise of the synthetic stand-in, in template standard deviations."""
    files: Callable[[], list[tuple[str, object]]]
    """``(file name, what it is checked against)`` for every file the dataset needs."""
    file_problem: Callable[[str, object], str | None]
    """What is wrong with one present file (``"is truncated: ..."``), or None."""
    packed: Callable[[str], list[str]]
    """Compressed copies of the files under a root, which torchvision does not read as they are."""
    unpack: str
    by_hand: str
    """How to put the files in place without a download."""
    legacy: tuple[str, ...] | None = None
    """torchvision's legacy cache directory (``training.pt``/``test.pt``), read instead of the files."""


def _tv_datasets():
    # torchvision costs about a second to import; only the real-file path needs it.
    import torchvision.datasets as datasets

    return datasets


# --- one file at a time -----------------------------------------------------------------------


def _idx_problem(path: str, magic: object) -> str | None:
    """An idx file's header against its length (reads only the header)."""
    ndim = 3 if magic == _IDX_IMAGES else 1
    header = 4 + 4 * ndim
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(header)
    except OSError as exc:
        return f"cannot be read ({exc})"
    if len(head) < header:
        return f"is truncated: {size} bytes, shorter than its idx header"
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        kind = "images" if magic == _IDX_IMAGES else "labels"
        return f"is not an idx file of the expected kind: magic number {found}, expected {magic} ({kind})"
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    want = header + math.prod(dims)
    if size != want:
        what = "truncated" if size < want else "longer than its header says"
        return (
            f"is {what}: its header promises {'x'.join(map(str, dims))} bytes of data ({want} bytes in all) but the file holds {size} bytes"
        )
    return None


def _md5_problem(path: str, md5: object) -> str | None:
    from torchvision.datasets.utils import calculate_md5

    actual = calculate_md5(path)
    if actual == md5:
        return None
    return f"is corrupt or truncated: {os.path.getsize(path)} bytes with md5 {actual}, torchvision expects md5 {md5}"


def _mnist_files() -> list[tuple[str, object]]:
    return [
        (f"{split}-{kind}", magic)
        for split in ("train", "t10k")
        for kind, magic in (("images-idx3-ubyte", _IDX_IMAGES), ("labels-idx1-ubyte", _IDX_LABELS))
    ]


def _cifar_files() -> list[tuple[str, object]]:
    """Read from torchvision's class at call time, so its names and md5s stay authoritative."""
    cls = _tv_datasets().CIFAR10
    return [(n, m) for n, m in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]]


def _existing(*paths: str) -> list[str]:
    return [p for p in paths if os.path.isfile(p)]


# --- the one validation path ------------------------------------------------------------------


def _present(spec: _Spec, path: str) -> tuple[str, list[tuple[str, object]], list[tuple[str, object]]]:
    base = os.path.join(path, *spec.files_dir)
    files = spec.files()
    return base, files, [(n, e) for n, e in files if os.path.isfile(os.path.join(base, n))]


def _absent_note(spec: _Spec, path: str) -> str | None:
    """None if the files are there to load; a note if there are none; DataError if half there, packed or misplaced."""
    base, files, present = _present(spec, path)
    names = [n for n, _ in files]
    if len(present) == len(files):
        return None
    if spec.legacy and len(_existing(*(os.path.join(path, *spec.legacy, f) for f in ("training.pt", "test.pt")))) == 2:
        return None  # torchvision's legacy cache; it loads that itself
    if present:
        found = [n for n, _ in present]
        raise DataError(
            f"{spec.label} under {base} is incomplete: {', '.join(n for n in names if n not in found)} missing "
            f"(found {', '.join(found)}); copy the missing files there, or delete {base} and download again (download=True)"
        )
    packed = spec.packed(path)
    if packed:
        raise DataError(
            f"{spec.label} under {os.path.dirname(packed[0])} holds only the compressed {', '.join(map(os.path.basename, packed))}: "
            f"{spec.unpack} in place, or pass download=True (torchvision verifies and extracts archives it already has)"
        )
    wanted = "/".join(spec.files_dir)
    for i in range(len(spec.files_dir)):  # the root pointed at a folder inside the expected layout
        inner = os.path.join(path, *spec.files_dir[i + 1 :], names[0])
        if os.path.isfile(inner):
            raise DataError(
                f"found {inner}, but torchvision expects {spec.label} files under <root>/{wanted}/: "
                f"pass the directory that contains {wanted}/ as the data root"
            )
    return f"no {spec.label} files under {path} (expected {os.path.join(base, names[0])})"


def _raise_failure(spec: _Spec, path: str, exc: BaseException, download: bool) -> NoReturn:
    """torchvision refused the files: say which file is bad and how to fix it."""
    base, files, present = _present(spec, path)
    if download and len(present) < len(files):
        raise DataError(
            f"could not download {spec.label} into {path}: {type(exc).__name__}: {exc}; check the network, or {spec.by_hand}"
        ) from exc
    for name, expected in present:
        problem = spec.file_problem(os.path.join(base, name), expected)
        if problem:
            raise DataError(
                f"{spec.label} file {os.path.join(base, name)} {problem}; delete {base} and download again (download=True)"
            ) from exc
    legacy = os.path.join(path, *spec.legacy) if spec.legacy else None
    if legacy and type(exc).__name__ == "UnpicklingError" and os.path.isdir(legacy):
        # torchvision reads its legacy cache with torch.load(weights_only=True), which refuses
        # anything but tensors; torch's advice to retry with weights_only=False is not ours to give.
        raise DataError(
            f"{spec.label}'s legacy cache {legacy} holds more than plain tensors, so torch.load(weights_only=True) "
            f"refused it; delete {legacy} and put the {spec.label} files in {base}, or download again (download=True)"
        ) from exc
    where = os.path.join(path, spec.folder)
    raise DataError(
        f"torchvision could not read {spec.label} under {where}: {type(exc).__name__}: {exc}; "
        f"delete {where} and download again (download=True)"
    ) from exc


def _check_split(spec: _Spec, where: str, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """The arrays torchvision read: image dtype and shape, one label per image, labels in range."""
    fix = f"delete {where} and download again (download=True)"
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != spec.file_shape or y.dim() != 1:
        raise DataError(
            f"{spec.label} {split} set under {where} has images {tuple(x.shape)} {x.dtype} and labels "
            f"{tuple(y.shape)}; expected (N, {', '.join(map(str, spec.file_shape))}) uint8 and (N,): {fix}"
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{spec.label} {split} set under {where} has {x.shape[0]} images but {y.shape[0]} labels: "
            f"the files are corrupt or from different downloads; {fix}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{spec.label} {split} set under {where} is empty; {fix}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= _NUM_CLASSES:
        raise DataError(
            f"{spec.label} {split} labels under {where} range over [{lo}, {hi}], expected [0, {_NUM_CLASSES - 1}]: "
            f"the label file is corrupt; {fix}"
        )


# --- loading ----------------------------------------------------------------------------------


def _resolve_root(root: str | os.PathLike[str] | None, label: str, download: bool) -> str | None:
    if root is None:
        if download:
            raise DataError(f"download=True needs a data root to download {label} into: pass root=... (--ampgate-data-root)")
        return None
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(path):
        if download:
            return path  # torchvision creates it
        raise DataError(
            f"data root {path} does not exist: create it and put the {label} files there, point "
            f"--ampgate-data-root (root=...) at the directory that holds them, or pass download=True "
            f"(--ampgate-download) to fetch {label} into it"
        )
    if not os.path.isdir(path):
        raise DataError(f"data root {path} is not a directory: point --ampgate-data-root (root=...) at a directory")
    return path


def _stand_in(spec: _Spec, n_train, n_test, seed: int, device, note: str, root, noise: float | None) -> DeviceDataset:
    ds = synthetic(
        spec.key,
        spec.sample_shape,
        _NUM_CLASSES,
        n_train=SYNTHETIC_N_TRAIN if n_train is None else n_train,
        n_test=SYNTHETIC_N_TEST if n_test is None else n_test,
        seed=seed,
        device=device,
        noise=spec.stand_in_noise if noise is None else noise,
    )
    if noise is not None:
        note += f" (synthetic noise {noise:g} instead of {spec.stand_in_noise:g})"
    return dataclasses.replace(ds, note=note, root=root)


def _normalise(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean[c]) / std[c]``, on the CPU for device-independent values."""
    c = u8.shape[1]
    x = u8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
    return x


def _load(spec: _Spec, root, download: bool, device, n_train, n_test, seed: int, synthetic_noise: float | None) -> DeviceDataset:
    """Real files through torchvision when they are there, else the synthetic stand-in, saying why."""
    n_train = None if n_train is None else positive_int(n_train, "n_train")
    n_test = None if n_test is None else positive_int(n_test, "n_test")
    path = _resolve_root(root, spec.label, download)
    if path is None:
        note = f"no data root given: synthetic {spec.label}-shaped data (set --ampgate-data-root for real {spec.label})"
        return _stand_in(spec, n_train, n_test, seed, device, note, None, synthetic_noise)
    if not download:
        absent = _absent_note(spec, path)
        if absent is not None:
            note = f"synthetic: {absent}; pass download=True (--ampgate-download) to fetch it"
            return _stand_in(spec, n_train, n_test, seed, device, note, path, synthetic_noise)
    cls = getattr(_tv_datasets(), spec.tv_class)
    try:
        train = cls(path, train=True, download=download)
        test = cls(path, train=False, download=False)
    except Exception as exc:  # torchvision raises assorted types for a bad or corrupt file
        _raise_failure(spec, path, exc, download)
    where = os.path.join(path, spec.folder)
    splits = []
    for split, ds in (("training", train), ("test", test)):
        x, y = torch.as_tensor(ds.data), torch.as_tensor(ds.targets)
        _check_split(spec, where, split, x, y)
        # MNIST (N, H, W) -> (N, 1, H, W); CIFAR-10 is stored NHWC -> NCHW (made contiguous by _normalise)
        splits.append((x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2), y))
    (train_u8, train_y), (test_u8, test_y) = splits
    if n_train is not None and n_train > train_u8.shape[0]:
        raise DataError(f"n_train={n_train} but {spec.label} under {where} holds only {train_u8.shape[0]} training samples")
    if n_test is not None and n_test > test_u8.shape[0]:
        raise DataError(f"n_test={n_test} but {spec.label} under {where} holds only {test_u8.shape[0]} test samples")
    perm = torch.randperm(train_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:n_train]
    n_te = test_u8.shape[0] if n_test is None else n_test
    dev = torch.device(device)
    return DeviceDataset(
        name=spec.key,
        source="torchvision-files",
        train_x=_normalise(train_u8[perm], spec.mean, spec.std).to(dev),
        train_y=train_y[perm].to(torch.int64).contiguous().to(dev),
        test_x=_normalise(test_u8[:n_te], spec.mean, spec.std).to(dev),
        test_y=test_y[:n_te].to(torch.int64).contiguous().to(dev),
        num_classes=_NUM_CLASSES,
        note=f"{spec.label} from {where}",
        root=path,
    )


_MNIST = _Spec(
    key="mnist",
    label="MNIST",
    tv_class="MNIST",
    folder="MNIST",
    files_dir=("MNIST", "raw"),
    file_shape=(28, 28),
    sample_shape=(1, 28, 28),
    mean=MNIST_MEAN,
    std=MNIST_STD,
    stand_in_noise=SYNTHETIC_NOISE,
    files=_mnist_files,
    file_problem=_idx_problem,
    packed=lambda path: _existing(*(os.path.join(path, "MNIST", "raw", n + ".gz") for n, _ in _mnist_files())),
    unpack="gunzip them",
    by_hand="copy the four idx files into <root>/MNIST/raw/ by hand",
    legacy=("MNIST", "processed"),
)
_CIFAR10 = _Spec(
    key="cifar10",
    label="CIFAR-10",
    tv_class="CIFAR10",
    folder="cifar-10-batches-py",
    files_dir=("cifar-10-batches-py",),
    file_shape=(32, 32, 3),
    sample_shape=(3, 32, 32),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    stand_in_noise=8.0,
    # The CIFAR CNN pools over 3072 inputs and saw through the default noise in under 100 steps
    # (accuracy 1.000, which makes an accuracy gate blind); at 8.0 it reaches ~0.88 in 150 CPU-profile steps.
    files=_cifar_files,
    file_problem=_md5_problem,
    packed=lambda path: _existing(os.path.join(path, _tv_datasets().CIFAR10.filename)),
    unpack="extract it (tar xzf)",
    by_hand="extract cifar-10-python.tar.gz into the data root by hand",
)


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    device: DeviceLike = "cpu",
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    synthetic_noise: float | None = None,
) -> DeviceDataset:
    """MNIST as (N, 1, 28, 28) float32, ``(x / 255 - 0.1307) / 0.3081``, on ``device``.

    Reads ``<root>/MNIST/raw/*-idx?-ubyte`` through ``torchvision.datasets.MNIST``. With no root,
    or a root without MNIST files, returns synthetic data of the same shape (20000 train / 2000
    test by default) whose ``note`` says why. Downloads only when ``download=True``. The training
    set is shuffled once with ``seed``; ``n_train`` takes a prefix of the shuffled training set,
    ``n_test`` a prefix of the test set in file order. ``synthetic_noise`` changes how hard the
    synthetic stand-in is (per-pixel noise in template standard deviations; real files ignore it).
    """
    return _load(_MNIST, root, download, device, n_train, n_test, seed, synthetic_noise)


def load_cifar10(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    device: DeviceLike = "cpu",
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    synthetic_noise: float | None = None,
) -> DeviceDataset:
    """CIFAR-10 as (N, 3, 32, 32) float32, ``(x / 255 - mean[c]) / std[c]``, on ``device``.

    Reads ``<root>/cifar-10-batches-py/`` through ``torchvision.datasets.CIFAR10`` (which checks
    every file's md5). torchvision keeps images NHWC; they are permuted to NCHW. With no root, or
    a root without CIFAR-10 files, returns synthetic data of the same shape (20000 train / 2000
    test by default) whose ``note`` says why. Downloads only when ``download=True``. Shuffling and
    ``n_train``/``n_test`` work as in :func:`load_mnist`. ``synthetic_noise`` changes how hard the
    synthetic stand-in is (per-pixel noise in template standard deviations; real files ignore it).
    """
    return _load(_CIFAR10, root, download, device, n_train, n_test, seed, synthetic_noise)
