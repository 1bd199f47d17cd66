"""Device-resident datasets for the AMP gate: the type every workload's data becomes.

The gate times training steps, so the data path must cost nothing inside the timed loop: every
dataset is loaded once, normalised once, shuffled once and kept as one resident tensor per split
on the target device. A training batch is then a contiguous slice of that tensor: a view, with no
copy, no kernel launch and no host synchronisation (a ``DataLoader`` would add CPU work and
host-to-device copies that drown the very difference between FP32 and AMP we measure).

Here: the :class:`DeviceDataset` itself, :func:`from_tensors` for a user's own tensors (checked
up front, naming the tensor), and :func:`synthetic`, a deterministic *learnable* set of any shape,
so the gate runs offline and in CI without data. The built-in MNIST and CIFAR-10 sets (real files,
or the synthetic stand-in) live in :mod:`pytest_ampgate.builtin_data`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError, WorkloadError

__all__ = ["SYNTHETIC_NOISE", "DeviceDataset", "from_tensors", "synthetic"]

DeviceLike = str | torch.device

# Synthetic-data knobs, chosen by measurement (see tests/test_data.py): with these, the reference
# 784-128-64-10 MLP at SGD lr 0.01, batch 64 reaches roughly 0.9 held-out accuracy in 300 steps,
# and no single pixel predicts the class much better than chance.
SYNTHETIC_NOISE = 1.5
"""Per-pixel Gaussian noise, in units of the template's standard deviation."""
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
    if floating_y:
        return _user_dataset(name, tensors, device, 0)  # the workload brings its own metric
    if num_classes is not None:
        try:
            num_classes = operator.index(num_classes)
        except TypeError:
            raise WorkloadError(f"dataset {name!r}: num_classes={num_classes!r} must be an integer") from None
    if train_y.dim() > 1:  # per-position labels: negative ignore_index values allowed, so no range check
        return _user_dataset(name, tensors, device, max(int(train_y.max()), int(test_y.max())) + 1 if num_classes is None else num_classes)
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


def positive_int(value: object, what: str) -> int:
    """``value`` as an int >= 1 (any integer type, never a float), or a ConfigError naming ``what``."""
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
    noise: float = SYNTHETIC_NOISE,
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
    num_classes = positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes} must be >= 2")
    n_train = positive_int(n_train, "n_train")
    n_test = positive_int(n_test, "n_test")
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


def check_dataset(dataset, where: str = "run(dataset=...)") -> None:
    """A dataset handed to ``run(dataset=...)`` is a DeviceDataset whose tensors hold data."""
    if dataset is None:
        return
    if not isinstance(dataset, DeviceDataset):
        raise WorkloadError(
            f"{where} takes a pytest_ampgate.data.DeviceDataset, got {type(dataset).__name__}; build one with "
            "pytest_ampgate.data.from_tensors(name, train_x, train_y, test_x, test_y), or give the workload "
            "its data with Workload(data=(train_x, train_y, test_x, test_y))"
        )
    check_not_meta(dataset.name, {k: getattr(dataset, k) for k in ("train_x", "train_y", "test_x", "test_y")})


def check_not_meta(name: str, tensors: dict) -> None:
    meta = [k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise WorkloadError(
            f"dataset {name!r}: {', '.join(meta)} {'is' if len(meta) == 1 else 'are'} on the meta device (shapes "
            "only, no data); build the tensors on 'cpu' (or the GPU) with real values"
        )
