"""Device-resident datasets for the AMP gate.

The gate times training steps, so the data path must cost nothing inside the timed loop: every
dataset here is loaded once, normalised once, shuffled once and kept as one resident tensor per
split on the target device. A training batch is then a contiguous slice of that tensor: a view,
with no copy, no kernel launch and no host synchronisation (a ``DataLoader`` would add CPU work
and host-to-device copies that drown the very difference between FP32 and AMP we measure).

Where the data comes from, in order of preference:

* real MNIST / CIFAR-10 files in a local root, read through ``torchvision.datasets`` (their
  ``.data``/``.targets`` arrays go straight into tensors: no PIL round trip). Nothing is ever
  downloaded unless ``download=True`` is passed.
* otherwise a deterministic, *learnable* synthetic set of the same shapes, so the gate still runs
  offline and in CI without data; the dataset's ``note`` says why synthetic data was used.
* a user's own tensors through :func:`from_tensors`.

Missing data falls back to synthetic data; data that is present but broken never does: a corrupt
or truncated file is a :class:`~pytest_ampgate.errors.DataError` that names the file, because
silently swapping real data for synthetic would change every accuracy number without a word.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError, WorkloadError

__all__ = [
    "BUILTIN_DATASETS",
    "SYNTHETIC_N_TEST",
    "SYNTHETIC_N_TRAIN",
    "DeviceDataset",
    "from_tensors",
    "load_builtin",
    "load_cifar10",
    "load_mnist",
    "synthetic",
]

DeviceLike = str | torch.device

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

_MNIST_SHAPE = (1, 28, 28)
_CIFAR10_SHAPE = (3, 32, 32)
_NUM_CLASSES = 10

# Synthetic-data knobs, chosen by measurement (see tests/test_data.py): with these, the reference
# 784-128-64-10 MLP at SGD lr 0.01, batch 64 reaches roughly 0.9 held-out accuracy in 300 steps,
# and no single pixel predicts the class much better than chance.
_SYN_NOISE = 1.5  # per-pixel Gaussian noise, in units of the template's standard deviation
_STAND_IN_NOISE = {"mnist": _SYN_NOISE, "cifar10": 8.0}
"""The CIFAR CNN pools over 3072 inputs and saw through 1.5 in under 100 steps (accuracy 1.000,
which makes an accuracy gate blind); at 8.0 it reaches ~0.88 in 150 CPU-profile steps."""
_SYN_GAIN = (0.5, 1.5)  # per-sample contrast, uniform
_SYN_OFFSET = 0.3  # per-sample brightness, Gaussian std
_SYN_MAX_SHIFT = 2  # per-sample translation in pixels, along spatial axes of length >= 8
_SYN_GRID = 4  # templates are random on a grid this many times coarser, then smoothly upsampled


@dataclass(eq=False)
class DeviceDataset:
    """A train/test split held as one resident tensor per split on one device.

    ``train_x``/``test_x`` are float32 of shape ``(N, *sample_shape)``, already normalised, or
    integer ids (``int64``/``int32``, e.g. tokens); ``train_y``/``test_y`` are int64 class labels
    (``(N,)``, or per position), or float32 targets for a workload with its own metric. The training split is shuffled once at load, so
    contiguous slices are mixed batches and :meth:`batch` can be a plain view.
    """

    name: str
    source: str  # "torchvision-files" | "synthetic" | "user"
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    note: str = ""
    root: str | None = None

    def __post_init__(self) -> None:
        # Cheap structural checks only (no host sync): a dataset whose splits disagree would fail
        # deep inside a timed loop with a shape error that names none of this.
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.shape[0] != y.shape[0]:
                raise WorkloadError(f"dataset {self.name!r}: {split}_y has {y.shape[0]} labels but {split}_x has {x.shape[0]} samples")
        devices = {t.device for t in (self.train_x, self.train_y, self.test_x, self.test_y)}
        if len(devices) != 1:
            raise WorkloadError(
                f"dataset {self.name!r}: tensors are on several devices ({sorted(map(str, devices))}); "
                "build it with from_tensors(..., device=...) or call .to(device)"
            )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension (e.g. ``(1, 28, 28)``)."""
        return tuple(self.train_x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``step``-th training batch, as views into the resident training tensors.

        Slicing keeps the timed loop free of copies, kernel launches and host syncs. Batches walk
        the (pre-shuffled) training set and wrap around deterministically, always full size: the
        start is ``(step * batch_size) % (N - batch_size + 1)``, so every mode that asks for step
        ``k`` gets exactly the same samples.
        """
        n = self.train_x.shape[0]
        try:
            bs = operator.index(batch_size)
            k = operator.index(step)
        except TypeError:
            raise WorkloadError(f"dataset {self.name!r}: batch(step={step!r}, batch_size={batch_size!r}) needs integers") from None
        if bs < 1 or bs > n:
            raise WorkloadError(
                f"dataset {self.name!r}: batch_size={bs} must be between 1 and the number of "
                f"training samples ({n}); use a smaller batch or a larger n_train"
            )
        if k < 0:
            raise WorkloadError(f"dataset {self.name!r}: step={k} must be >= 0")
        start = (k * bs) % (n - bs + 1)
        return self.train_x[start : start + bs], self.train_y[start : start + bs]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out split in order, as views of at most ``batch_size`` samples (the last may be short).

        Evaluation in slices bounds activation memory whatever the size of the test set.
        """
        try:
            bs = operator.index(batch_size)
        except TypeError:
            raise WorkloadError(f"dataset {self.name!r}: test batch_size={batch_size!r} must be an integer") from None
        if bs < 1:
            raise WorkloadError(f"dataset {self.name!r}: test batch_size={bs} must be >= 1")
        return self._iter_test(bs)

    def _iter_test(self, bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.test_x.shape[0], bs):
            yield self.test_x[start : start + bs], self.test_y[start : start + bs]

    def to(self, device: DeviceLike) -> DeviceDataset:
        """A copy on ``device`` (the same object's tensors if they are already there)."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def describe(self) -> dict:
        """JSON-able summary for reports: what data the numbers were measured on, and why."""
        return {
            "name": self.name,
            "source": self.source,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "sample_shape": list(self.sample_shape),
            "num_classes": int(self.num_classes),
            "root": self.root,
            "note": self.note,
        }


# ---------------------------------------------------------------------------------------------
# A user's own tensors


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy outside inference mode of a tensor made inside it (say under a leaked
    ``torch.inference_mode()``): autograd refuses to save inference tensors for backward."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def from_tensors(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    device: DeviceLike = "cpu",
) -> DeviceDataset:
    """Wrap a user's own classification data, validated up front.

    Bad tensors are caught here, with a message naming the tensor, rather than as a shape error
    inside a timed step of some precision mode. ``x`` must be floating with a batch dimension;
    Floating inputs are cast to float32 (the precision modes cast them themselves) but NOT
    normalised. Integer inputs (``int64``/``int32`` token ids, indices) stay integers in every
    mode: a pure-bf16 cast would silently change most token ids. Targets are 1-D integer class
    labels in ``[0, num_classes)`` (``num_classes`` defaults to the largest label + 1), integer
    labels with more dimensions (per token or pixel, e.g. ``(N, T)``; negative values such as
    CrossEntropyLoss's ``ignore_index`` -100 are allowed there), or floating targets (regression,
    soft labels; then ``num_classes`` is 0 and the workload brings a metric). NaN/inf inputs are
    refused: they would be blamed on AMP by the numerics check. Everything is detached, moved to
    ``device`` and made contiguous.
    """
    tensors = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise WorkloadError(f"dataset {name!r}: {key} must be a torch.Tensor, got {type(t).__name__}")
    for key in ("train_x", "test_x"):
        t = tensors[key]
        if not (t.is_floating_point() or t.dtype in INTEGER_INPUTS):
            raise WorkloadError(_input_dtype_message(name, key, t))
        if t.dim() < 2:
            raise WorkloadError(
                f"dataset {name!r}: {key} has shape {_shape(t)}; expected (N, *sample_shape) with a "
                f"batch dimension first, e.g. {key}.unsqueeze(1) for one feature per sample"
            )
        if t.shape[0] == 0:
            raise WorkloadError(f"dataset {name!r}: {key} has shape {_shape(t)}: it holds no samples")
    for key in ("train_y", "test_y"):
        t = tensors[key]
        if t.is_complex() or t.dtype == torch.bool:
            raise WorkloadError(
                f"dataset {name!r}: {key} has dtype {t.dtype}; expected integer class labels "
                f"(int64), e.g. {key}.long(), or floating regression targets, e.g. {key}.float()"
            )
        if t.dim() < 1:
            raise WorkloadError(f"dataset {name!r}: {key} is a scalar; expected one target per sample, shape (N, ...)")
    floating_y = [k for k in ("train_y", "test_y") if tensors[k].is_floating_point()]
    if len(floating_y) == 1:
        raise WorkloadError(
            f"dataset {name!r}: {floating_y[0]} is floating but the other split's targets are integers; "
            "use one kind of target for both splits"
        )
    if tensors["train_y"].shape[1:] != tensors["test_y"].shape[1:]:
        raise WorkloadError(
            f"dataset {name!r}: test_y has shape {_shape(test_y)} but train_y has shape {_shape(train_y)}; "
            "targets must have the same per-sample shape in both splits"
        )
    for split in ("train", "test"):
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if y.shape[0] != x.shape[0]:
            raise WorkloadError(f"dataset {name!r}: {split}_y has {y.shape[0]} labels but {split}_x has {x.shape[0]} samples")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise WorkloadError(
            f"dataset {name!r}: test_x has shape {_shape(test_x)} but train_x has shape {_shape(train_x)}; "
            f"test samples must have the training sample shape {tuple(train_x.shape[1:])}"
        )
    for key in ("train_x", "test_x", *floating_y):
        if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
            raise WorkloadError(
                f"dataset {name!r}: {key} contains NaN or inf; non-finite inputs would make every "
                "precision mode's loss non-finite and be reported as an AMP failure"
            )
    if floating_y or train_y.dim() > 1:
        return _user_dataset(name, tensors, device, _target_classes(train_y, test_y, num_classes, name))
    lo = min(int(train_y.min()), int(test_y.min()))
    hi = max(int(train_y.max()), int(test_y.max()))
    if lo < 0:
        which = "train_y" if int(train_y.min()) < 0 else "test_y"
        raise WorkloadError(f"dataset {name!r}: {which} holds label {lo}; class labels must be >= 0")
    if num_classes is None:
        num_classes = hi + 1
        if num_classes < 2:
            raise WorkloadError(f"dataset {name!r}: all labels are 0, so num_classes would be 1; pass num_classes explicitly")
    else:
        try:
            num_classes = operator.index(num_classes)
        except TypeError:
            raise WorkloadError(f"dataset {name!r}: num_classes={num_classes!r} must be an integer") from None
        if num_classes < 2:
            raise WorkloadError(f"dataset {name!r}: num_classes={num_classes} must be >= 2")
        if hi >= num_classes:
            which = "train_y" if int(train_y.max()) == hi else "test_y"
            raise WorkloadError(
                f"dataset {name!r}: {which} holds label {hi} but num_classes={num_classes}; labels must lie in [0, {num_classes - 1}]"
            )
    return _user_dataset(name, tensors, device, int(num_classes))


INTEGER_INPUTS = (torch.int64, torch.int32)
"""Integer input dtypes a user's data may hold (token ids, indices: what nn.Embedding takes)."""


def _input_dtype_message(name: str, key: str, t: torch.Tensor) -> str:
    """What is wrong with an input dtype, and the fix; the uint8 advice only where it applies (images)."""
    text = (
        f"dataset {name!r}: {key} has dtype {t.dtype} and shape {_shape(t)}; inputs must be floating "
        f"(float32, float64, float16, bfloat16) or integer ids (int64, int32)"
    )
    if t.dtype == torch.uint8:
        text += f": for uint8 images use {key}.float() / 255, for uint8 token ids {key}.long()"
    elif t.dtype == torch.bool:
        text += f": for a mask use {key}.float()"
    elif not (t.is_floating_point() or t.is_complex()):
        text += f": use {key}.long()"
    return text


def _target_classes(train_y: torch.Tensor, test_y: torch.Tensor, num_classes, name: str) -> int:
    """Classes of per-position integer labels (largest label + 1), or 0 for floating targets."""
    if train_y.is_floating_point():
        return 0
    if num_classes is not None:
        try:
            return operator.index(num_classes)
        except TypeError:
            raise WorkloadError(f"dataset {name!r}: num_classes={num_classes!r} must be an integer") from None
    return max(int(train_y.max()), int(test_y.max())) + 1


def _user_dataset(name: str, tensors: dict, device, num_classes: int) -> DeviceDataset:
    """Detached, contiguous, on ``device``: floating inputs as float32, integer inputs and labels kept integer."""
    dev = torch.device(device)

    def inputs(t):
        t = _normal_tensor(t)
        return t.detach().to(device=dev, dtype=torch.float32 if t.is_floating_point() else t.dtype).contiguous()

    def targets(t):
        t = _normal_tensor(t)
        return t.detach().to(device=dev, dtype=torch.float32 if t.is_floating_point() else torch.int64).contiguous()

    return DeviceDataset(
        name=name,
        source="user",
        train_x=inputs(tensors["train_x"]),
        train_y=targets(tensors["train_y"]),
        test_x=inputs(tensors["test_x"]),
        test_y=targets(tensors["test_y"]),
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------------------------
# Synthetic data


def _positive_int(value: object, what: str) -> int:
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what}={value!r} must be a positive integer") from None
    if v < 1:
        raise ConfigError(f"{what}={v} must be a positive integer")
    return v


def _canonical_shape(sample_shape: Sequence[int]) -> tuple[int, int, int]:
    """View any sample shape as (channels, H, W) so one generator serves images, sequences and vectors."""
    if len(sample_shape) == 1:
        return (1, 1, sample_shape[0])
    if len(sample_shape) == 2:
        return (1, sample_shape[0], sample_shape[1])
    return (math.prod(sample_shape[:-2]), sample_shape[-2], sample_shape[-1])


def _smooth_templates(num_classes: int, chw: tuple[int, int, int], pad: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """One smooth random pattern per class, zero mean and unit variance each.

    Smooth (random on a coarse grid, bilinearly upsampled) so that neighbouring pixels agree, as in
    real images: convolutions have structure to find and a per-pixel rule has little to go on.
    """
    c, h, w = chw
    hh, ww = h + 2 * pad[0], w + 2 * pad[1]
    coarse = torch.randn(num_classes, c, max(1, -(-hh // _SYN_GRID)), max(1, -(-ww // _SYN_GRID)), generator=g, dtype=torch.float64)
    t = F.interpolate(coarse, size=(hh, ww), mode="bilinear", align_corners=False)
    flat = t.reshape(num_classes, -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True) if flat.shape[1] > 1 else torch.ones_like(flat)
    flat = flat / std.clamp_min(1e-12)
    return flat.reshape(num_classes, c, hh, ww).to(torch.float32)


def _synthetic_split(
    templates: torch.Tensor, chw: tuple[int, int, int], pad: tuple[int, int], n: int, seed: int, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples: a class template, shifted, scaled and offset per sample, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    k = templates.shape[0]
    c, h, w = chw
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced classes, random order
    gain = torch.empty(n).uniform_(_SYN_GAIN[0], _SYN_GAIN[1], generator=g)
    offset = torch.randn(n, generator=g) * _SYN_OFFSET
    sy = torch.randint(0, 2 * pad[0] + 1, (n,), generator=g)
    sx = torch.randint(0, 2 * pad[1] + 1, (n,), generator=g)
    x = torch.randn(n, c, h, w, generator=g).mul_(noise)
    signal = torch.empty(n, c, h, w)
    code = sy * (2 * pad[1] + 1) + sx
    for shift in range((2 * pad[0] + 1) * (2 * pad[1] + 1)):
        idx = (code == shift).nonzero().flatten()
        if idx.numel():
            dy, dx = divmod(shift, 2 * pad[1] + 1)
            signal[idx] = templates[:, :, dy : dy + h, dx : dx + w][y[idx]]
    x.addcmul_(signal, gain.view(n, 1, 1, 1)).add_(offset.view(n, 1, 1, 1))
    # Analytic, not measured, normalisation: E[gain^2] + offset^2 + noise^2 is the variance of a
    # unit-variance template under this model. Measuring it would be a parallel reduction whose
    # rounding can depend on the thread count, and we promise bit-identical data per seed.
    lo, hi = _SYN_GAIN
    scale = math.sqrt((lo * lo + lo * hi + hi * hi) / 3.0 + _SYN_OFFSET**2 + noise**2)
    x.div_(scale)
    return x, y


def synthetic(
    name: str,
    sample_shape: Sequence[int],
    num_classes: int,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    device: DeviceLike = "cpu",
    noise: float = _SYN_NOISE,
) -> DeviceDataset:
    """A deterministic, learnable classification set of any sample shape.

    Each class has a fixed smooth random template; a sample is its class template, translated by
    up to two pixels, multiplied by a random gain, offset by a random brightness, plus Gaussian
    noise, scaled to roughly zero mean / unit variance. A small MLP or CNN learns it well above
    chance in a few hundred SGD steps, yet no single pixel separates the classes (the noise is
    larger than the per-pixel signal), so numerically broken training shows up in the accuracy.

    Everything is drawn from ``torch.Generator`` objects seeded by ``seed`` on the CPU, then moved
    to ``device``: the same seed gives bit-identical tensors whatever the global RNG state or the
    device. Train and test share the templates but draw from independent streams, so the test set
    does not change with ``n_train``. Classes are balanced (counts differ by at most one).
    """
    try:
        shape = tuple(operator.index(d) for d in sample_shape)
    except TypeError:
        raise ConfigError(f"sample_shape={sample_shape!r} must be a sequence of positive integers") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"sample_shape={shape!r} must be a non-empty sequence of positive integers")
    num_classes = _positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes} must be >= 2")
    n_train = _positive_int(n_train, "n_train")
    n_test = _positive_int(n_test, "n_test")
    seed = operator.index(seed)

    chw = _canonical_shape(shape)
    pad = tuple(_SYN_MAX_SHIFT if d >= 8 else 0 for d in chw[1:])
    g = torch.Generator().manual_seed(seed)
    templates = _smooth_templates(num_classes, chw, pad, g)  # type: ignore[arg-type]
    train_seed, test_seed = (int(s) for s in torch.randint(0, 2**62, (2,), generator=g))
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ConfigError(f"noise={noise!r} must be a non-negative number")
    train_x, train_y = _synthetic_split(templates, chw, pad, n_train, train_seed, noise)  # type: ignore[arg-type]
    test_x, test_y = _synthetic_split(templates, chw, pad, n_test, test_seed, noise)  # type: ignore[arg-type]
    dev = torch.device(device)
    return DeviceDataset(
        name=name,
        source="synthetic",
        train_x=train_x.reshape(n_train, *shape).to(dev),
        train_y=train_y.to(dev),
        test_x=test_x.reshape(n_test, *shape).to(dev),
        test_y=test_y.to(dev),
        num_classes=num_classes,
        note=f"synthetic {name} data of shape {shape}, {num_classes} classes, seed {seed}",
    )


# ---------------------------------------------------------------------------------------------
# Real MNIST / CIFAR-10 files through torchvision


def _tv_datasets():
    # torchvision costs about a second to import; only the real-file path needs it.
    import torchvision.datasets as datasets

    return datasets


def _check_sizes(n_train: int | None, n_test: int | None) -> tuple[int | None, int | None]:
    return (
        None if n_train is None else _positive_int(n_train, "n_train"),
        None if n_test is None else _positive_int(n_test, "n_test"),
    )


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


def _stand_in(
    name: str, shape: tuple[int, ...], n_train, n_test, seed: int, device, note: str, root, noise: float | None = None
) -> DeviceDataset:
    ds = synthetic(
        name,
        shape,
        _NUM_CLASSES,
        n_train=SYNTHETIC_N_TRAIN if n_train is None else n_train,
        n_test=SYNTHETIC_N_TEST if n_test is None else n_test,
        seed=seed,
        device=device,
        noise=_STAND_IN_NOISE[name] if noise is None else noise,
    )
    if noise is not None:
        note += f" (synthetic noise {noise:g} instead of {_STAND_IN_NOISE[name]:g})"
    return dataclasses.replace(ds, note=note, root=root)


def _normalise(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean[c]) / std[c]``, on the CPU for device-independent values."""
    c = u8.shape[1]
    x = u8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
    return x


def _finish_real(
    name: str,
    where: str,
    root: str,
    train_u8: torch.Tensor,
    train_y: torch.Tensor,
    test_u8: torch.Tensor,
    test_y: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    n_train: int | None,
    n_test: int | None,
    seed: int,
    device,
) -> DeviceDataset:
    """Check the arrays, shuffle train once, take the requested prefixes, normalise, move."""
    label = {"mnist": "MNIST", "cifar10": "CIFAR-10"}[name]
    for split, x, y in (("training", train_u8, train_y), ("test", test_u8, test_y)):
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{label} {split} set under {where} has {x.shape[0]} images but {y.shape[0]} labels: the files "
                f"are corrupt or from different downloads; delete {where} and download again (download=True)"
            )
        if x.shape[0] == 0:
            raise DataError(f"{label} {split} set under {where} is empty; delete {where} and download again")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= _NUM_CLASSES:
            raise DataError(
                f"{label} {split} labels under {where} range over [{lo}, {hi}], expected [0, {_NUM_CLASSES - 1}]: "
                f"the label file is corrupt; delete {where} and download again (download=True)"
            )
    n_avail_train, n_avail_test = train_u8.shape[0], test_u8.shape[0]
    if n_train is not None and n_train > n_avail_train:
        raise DataError(f"n_train={n_train} but {label} under {where} holds only {n_avail_train} training samples")
    if n_test is not None and n_test > n_avail_test:
        raise DataError(f"n_test={n_test} but {label} under {where} holds only {n_avail_test} test samples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_avail_train, generator=g)
    if n_train is not None:
        perm = perm[:n_train]
    n_te = n_avail_test if n_test is None else n_test
    dev = torch.device(device)
    return DeviceDataset(
        name=name,
        source="torchvision-files",
        train_x=_normalise(train_u8[perm], mean, std).to(dev),
        train_y=train_y[perm].to(torch.int64).contiguous().to(dev),
        test_x=_normalise(test_u8[:n_te], mean, std).to(dev),
        test_y=test_y[:n_te].to(torch.int64).contiguous().to(dev),
        num_classes=_NUM_CLASSES,
        note=f"{label} from {where}",
        root=root,
    )


_MNIST_FILES = (
    ("train-images-idx3-ubyte", 2051),
    ("train-labels-idx1-ubyte", 2049),
    ("t10k-images-idx3-ubyte", 2051),
    ("t10k-labels-idx1-ubyte", 2049),
)


def _check_idx_file(path: str, magic: int) -> None:
    """Raise DataError naming ``path`` if its idx header or length is wrong (reads only the header)."""
    expected_dims = 3 if magic == 2051 else 1
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4 + 4 * expected_dims)
    except OSError as exc:
        raise DataError(f"cannot read MNIST file {path}: {exc}") from exc
    fix = f"delete {os.path.dirname(path)} and download MNIST again (download=True)"
    if len(head) < 4 + 4 * expected_dims:
        raise DataError(f"MNIST file {path} is truncated: {size} bytes, shorter than its idx header; {fix}")
    found = int.from_bytes(head[:4], "big")
    if found != magic:
        raise DataError(
            f"MNIST file {path} is not an idx file of the expected kind: magic number {found}, expected {magic} "
            f"({'images' if magic == 2051 else 'labels'}); {fix}"
        )
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_dims)]
    want = 4 + 4 * expected_dims + math.prod(dims)
    if size != want:
        what = "truncated" if size < want else "longer than its header says"
        raise DataError(
            f"MNIST file {path} is {what}: its header promises {'x'.join(map(str, dims))} bytes of data "
            f"({want} bytes in all) but the file holds {size} bytes; {fix}"
        )


def _mnist_absent_note(path: str) -> str | None:
    """None if MNIST files are there to load; a note if there are none; DataError if half there or misplaced."""
    raw = os.path.join(path, "MNIST", "raw")
    processed = os.path.join(path, "MNIST", "processed")
    names = [n for n, _ in _MNIST_FILES]
    present = [n for n in names if os.path.isfile(os.path.join(raw, n))]
    if len(present) == len(names):
        return None
    if all(os.path.isfile(os.path.join(processed, f)) for f in ("training.pt", "test.pt")):
        return None  # torchvision's legacy cache; it loads that itself
    if present:
        missing = [n for n in names if n not in present]
        raise DataError(
            f"MNIST under {raw} is incomplete: {', '.join(missing)} missing (found {', '.join(present)}); "
            f"copy the missing files there, or delete {raw} and download again (download=True)"
        )
    gz = [n + ".gz" for n in names if os.path.isfile(os.path.join(raw, n + ".gz"))]
    if gz:
        raise DataError(
            f"MNIST under {raw} holds only the compressed {', '.join(gz)}: gunzip them in place, or pass "
            "download=True (torchvision verifies and extracts archives it already has)"
        )
    for inner in (path, os.path.join(path, "raw")):
        if os.path.isfile(os.path.join(inner, names[0])):
            raise DataError(
                f"found {os.path.join(inner, names[0])}, but torchvision expects MNIST files under "
                f"<root>/MNIST/raw/: pass the directory that contains MNIST/raw/ as the data root"
            )
    return f"no MNIST files under {path} (expected {os.path.join(raw, names[0])})"


def _raise_mnist_failure(path: str, exc: BaseException, download: bool) -> None:
    raw = os.path.join(path, "MNIST", "raw")
    present = [(n, m) for n, m in _MNIST_FILES if os.path.isfile(os.path.join(raw, n))]
    for n, magic in present:
        _check_idx_file(os.path.join(raw, n), magic)
    if download and len(present) < len(_MNIST_FILES):
        raise DataError(
            f"could not download MNIST into {raw}: {type(exc).__name__}: {exc}; check the network, or copy the four idx files there by hand"
        ) from exc
    processed = os.path.join(path, "MNIST", "processed")
    if type(exc).__name__ == "UnpicklingError" and os.path.isdir(processed):
        # torchvision reads its legacy cache with torch.load(weights_only=True), which refuses
        # anything but tensors; torch's advice to retry with weights_only=False is not ours to give.
        raise DataError(
            f"MNIST's legacy cache {processed} holds more than plain tensors, so torch.load(weights_only=True) "
            f"refused it; delete {processed} and put the four idx files in {raw}, "
            "or download again (download=True)"
        ) from exc
    raise DataError(
        f"torchvision could not read MNIST under {os.path.join(path, 'MNIST')}: {type(exc).__name__}: {exc}; "
        "delete that directory and download again (download=True)"
    ) from exc


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
    return _load_real(_MNIST, root, download, device, n_train, n_test, seed, synthetic_noise)


@dataclass(frozen=True)
class _RealDataset:
    """What differs between the built-in datasets on the real-file path; the steps are shared."""

    key: str
    label: str
    sample_shape: tuple[int, ...]
    tv_class: str
    file_shape: tuple[int, ...]
    """Shape of one image as torchvision stores it."""
    folder: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    absent_note: Callable[[str], str | None]
    raise_failure: Callable[[str, BaseException, bool], None]


def _load_real(
    spec: _RealDataset, root, download: bool, device, n_train, n_test, seed: int, synthetic_noise: float | None = None
) -> DeviceDataset:
    """Real files through torchvision when they are there, else the synthetic stand-in, saying why."""
    n_train, n_test = _check_sizes(n_train, n_test)
    path = _resolve_root(root, spec.label, download)
    if path is None:
        note = f"no data root given: synthetic {spec.label}-shaped data (set --ampgate-data-root for real {spec.label})"
        return _stand_in(spec.key, spec.sample_shape, n_train, n_test, seed, device, note, None, synthetic_noise)
    if not download:
        absent = spec.absent_note(path)
        if absent is not None:
            note = f"synthetic: {absent}; pass download=True (--ampgate-download) to fetch it"
            return _stand_in(spec.key, spec.sample_shape, n_train, n_test, seed, device, note, path, synthetic_noise)
    cls = getattr(_tv_datasets(), spec.tv_class)
    try:
        train = cls(path, train=True, download=download)
        test = cls(path, train=False, download=False)
    except Exception as exc:  # torchvision raises assorted types for a bad or corrupt file
        spec.raise_failure(path, exc, download)
        raise  # unreachable: raise_failure always raises
    where = os.path.join(path, spec.folder)
    arrays = []
    for split, ds in (("training", train), ("test", test)):
        data, targets = torch.as_tensor(ds.data), torch.as_tensor(ds.targets)
        if data.dtype != torch.uint8 or tuple(data.shape[1:]) != spec.file_shape or targets.dim() != 1:
            raise DataError(
                f"{spec.label} {split} set under {where} has images {tuple(data.shape)} {data.dtype} and labels "
                f"{tuple(targets.shape)}; expected (N, {', '.join(map(str, spec.file_shape))}) uint8 and (N,): "
                f"delete {where} and download again"
            )
        if data.dim() == 3:  # MNIST: (N, H, W) -> (N, 1, H, W)
            data = data.unsqueeze(1)
        else:  # CIFAR-10 is stored NHWC -> NCHW (made contiguous by _normalise)
            data = data.permute(0, 3, 1, 2)
        arrays += [data, targets]
    return _finish_real(spec.key, where, path, *arrays, spec.mean, spec.std, n_train, n_test, seed, device)


def _cifar_names() -> tuple[str, list]:
    """(folder, [(file, md5), ...]) read from torchvision's class at call time, so it stays authoritative."""
    cls = _tv_datasets().CIFAR10
    files = [(n, m) for n, m in list(cls.train_list) + list(cls.test_list)]
    files.append((cls.meta["filename"], cls.meta["md5"]))
    return cls.base_folder, files


def _cifar_absent_note(path: str) -> str | None:
    folder, files = _cifar_names()
    base = os.path.join(path, folder)
    names = [n for n, _ in files]
    present = [n for n in names if os.path.isfile(os.path.join(base, n))]
    if len(present) == len(names):
        return None
    if present:
        missing = [n for n in names if n not in present]
        raise DataError(
            f"CIFAR-10 under {base} is incomplete: {', '.join(missing)} missing; delete {base} and download "
            "again (download=True), or copy the missing files there"
        )
    archive = os.path.join(path, _tv_datasets().CIFAR10.filename)
    if os.path.isfile(archive):
        raise DataError(
            f"found {archive} but not the extracted {base}/: extract it in place (tar xzf) or pass "
            "download=True (torchvision verifies and extracts an archive it already has)"
        )
    if os.path.isfile(os.path.join(path, names[0])):
        raise DataError(
            f"found {os.path.join(path, names[0])}, but torchvision expects CIFAR-10 files under "
            f"<root>/{folder}/: pass the directory that contains {folder}/ as the data root"
        )
    return f"no CIFAR-10 files under {path} (expected {os.path.join(base, names[0])})"


def _raise_cifar_failure(path: str, exc: BaseException, download: bool) -> None:
    from torchvision.datasets.utils import calculate_md5

    folder, files = _cifar_names()
    base = os.path.join(path, folder)
    fix = f"delete {base} and download again (download=True)"
    present = [(n, m) for n, m in files if os.path.isfile(os.path.join(base, n))]
    if download and len(present) < len(files):
        raise DataError(
            f"could not download CIFAR-10 into {path}: {type(exc).__name__}: {exc}; check the network, or "
            f"extract cifar-10-python.tar.gz there by hand"
        ) from exc
    for n, md5 in present:
        fpath = os.path.join(base, n)
        actual = calculate_md5(fpath)
        if actual != md5:
            raise DataError(
                f"CIFAR-10 file {fpath} is corrupt or truncated: {os.path.getsize(fpath)} bytes with md5 {actual}, "
                f"torchvision expects md5 {md5}; {fix}"
            ) from exc
    raise DataError(f"torchvision could not read CIFAR-10 under {base}: {type(exc).__name__}: {exc}; {fix}") from exc


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
    return _load_real(_CIFAR10, root, download, device, n_train, n_test, seed, synthetic_noise)


_MNIST = _RealDataset(
    "mnist",
    "MNIST",
    _MNIST_SHAPE,
    "MNIST",
    (28, 28),
    "MNIST",
    MNIST_MEAN,
    MNIST_STD,
    _mnist_absent_note,
    _raise_mnist_failure,
)
_CIFAR10 = _RealDataset(
    "cifar10",
    "CIFAR-10",
    _CIFAR10_SHAPE,
    "CIFAR10",
    (32, 32, 3),
    "cifar-10-batches-py",
    CIFAR10_MEAN,
    CIFAR10_STD,
    _cifar_absent_note,
    _raise_cifar_failure,
)


BUILTIN_DATASETS = {"mnist": load_mnist, "cifar10": load_cifar10}


def load_builtin(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    device: DeviceLike = "cpu",
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> DeviceDataset:
    """Load a built-in dataset by name (``"mnist"`` or ``"cifar10"``; case, ``-`` and ``_`` ignored)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    loader = BUILTIN_DATASETS.get(key)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; built-in datasets are: {', '.join(sorted(BUILTIN_DATASETS))}")
    return loader(root, download=download, device=device, n_train=n_train, n_test=n_test, seed=seed)
