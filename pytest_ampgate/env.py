"""Where a measurement was taken: the environment fingerprint and the key baselines are stored under.

AMP's benefit is a property of the hardware and the software stack as much as of the model: a new GPU
generation, a PyTorch minor release or a CUDA major release can each switch tensor-core kernels on or
off. So a stored baseline is only comparable with a measurement from the same environment, and every
report says which environment it came from. :func:`fingerprint` records that environment;
:meth:`Environment.key` is the part of it that baselines are keyed by.  Whether the GPU was quiet
while it was measured is :mod:`.gpu_noise`'s question.

:class:`Environment` is a frozen dataclass; ``records.to_dict`` writes it into reports and
:meth:`Environment.from_dict` reads it back, naming what a stored copy lacks.
"""

from __future__ import annotations

import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import modes, nvml
from .errors import BaselineError
from .modes import DeviceLike
from .precision_policy import TF32Policy, current_tf32_policy
from .records import from_dict

__all__ = ["Environment", "fingerprint"]

_KEY_SEPARATOR = "|"


@dataclass(frozen=True)
class Environment:
    """What a measurement ran on: enough to decide whether two measurements are comparable.

    ``device_name`` is the GPU model for CUDA, the CPU model for CPU timings. The CUDA-only fields
    (``compute_capability``, ``cudnn_version``, ``driver_version``) are None for a CPU fingerprint;
    ``cuda_version`` is what torch was built with (``torch.version.cuda``), None for a CPU-only build.
    ``gpu_count`` is the number of visible CUDA devices (0 for a CPU fingerprint, which makes no
    CUDA calls).
    """

    device_type: str
    device_name: str
    compute_capability: str | None
    bf16_supported: bool
    torch_version: str
    cuda_version: str | None
    cudnn_version: int | None
    driver_version: str | None
    gpu_count: int
    tf32: TF32Policy
    python_version: str
    platform: str

    def key(self) -> str:
        """The environment key baselines are stored under.

        CUDA: ``"<GPU name>|sm<cc>|torch<major.minor>|cuda<major>"``, e.g.
        ``"NVIDIA H100 80GB HBM3|sm90|torch2.11|cuda13"``; CPU: ``"cpu|<CPU model>|torch<major.minor>"``.

        Why these parts: the GPU model and its compute capability decide which tensor-core kernels
        exist at all; a torch minor release changes autocast op lists, kernels and defaults; a CUDA
        major release changes cuBLAS/cuDNN heuristics. Each of these can move AMP's speedup and
        memory by more than any sensible tolerance, so a baseline from a different one is not
        comparable. Patch releases, the driver, cuDNN minor versions, Python and the OS are recorded
        but left out, so that routine upgrades do not orphan every stored baseline. The key is
        printable ASCII without ``"`` or ``\\`` (safe as a JSON key and in a terminal), and the
        parts are separated by ``|``, which is removed from the names themselves.
        """
        torch_mm = _major_minor(self.torch_version)
        if self.device_type == "cuda":
            parts = [_key_part(self.device_name)]
            if self.compute_capability:
                parts.append("sm" + self.compute_capability.replace(".", ""))
            parts.append(f"torch{torch_mm}")
            if self.cuda_version:
                parts.append(f"cuda{_major(self.cuda_version)}")
            return _KEY_SEPARATOR.join(parts)
        return _KEY_SEPARATOR.join([_key_part(self.device_type), _key_part(self.device_name), f"torch{torch_mm}"])

    def short(self) -> str:
        """A few words for failure messages, e.g. ``"NVIDIA H100, torch 2.11"``."""
        torch_mm = _major_minor(self.torch_version)
        if self.device_type == "cuda":
            return f"{_short_gpu_name(self.device_name)}, torch {torch_mm}"
        return f"{self.device_type.upper()} ({self.device_name}), torch {torch_mm}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Environment:
        """A stored environment (``records.to_dict`` output) read back; what it lacks is named.

        Unknown keys are ignored so newer files stay readable.
        """
        _require(data, ("device_type", "device_name", "bf16_supported", "torch_version", "gpu_count", "tf32"), "environment")
        if not isinstance(data["tf32"], Mapping):
            raise BaselineError(f"environment field 'tf32' must be an object, got {type(data['tf32']).__name__}")
        return from_dict(cls, data)


def fingerprint(device: DeviceLike = None) -> Environment:
    """Fingerprint the environment a measurement on ``device`` runs in.

    ``device`` is ``"cuda"``, ``"cuda:1"``, ``"cpu"``, a ``torch.device``, a CUDA index, or None for
    the current CUDA device when there is one and the CPU otherwise. A CPU fingerprint makes no CUDA
    calls (it must work on machines without a GPU and must not create a CUDA context). Asking for a
    CUDA device that is not there is a :class:`~pytest_ampgate.errors.ConfigError`: silently falling
    back to the CPU would file the measurement under the wrong baseline key.
    """
    device = modes.parse_device(device)
    common = dict(
        torch_version=str(torch.__version__),
        cuda_version=_opt_str(getattr(torch.version, "cuda", None)),
        tf32=current_tf32_policy(),
        python_version=_platform.python_version(),
        platform=_platform.platform(),
    )
    if device.type != "cuda":
        return Environment(
            device_type=device.type,
            device_name=_cpu_model(),
            compute_capability=None,
            bf16_supported=True,
            cudnn_version=None,
            driver_version=None,
            gpu_count=0,
            **common,
        )

    modes.require_device(device, f"fingerprint(device={str(device)!r})")
    index = modes.cuda_index(device)
    props = torch.cuda.get_device_properties(index)
    try:
        cudnn_version = torch.backends.cudnn.version()
    except Exception:
        cudnn_version = None
    return Environment(
        device_type="cuda",
        device_name=str(props.name),
        compute_capability=f"{props.major}.{props.minor}",
        bf16_supported=modes.cuda_bf16_supported(index),
        cudnn_version=None if cudnn_version is None else int(cudnn_version),
        driver_version=nvml.driver_version(),
        gpu_count=int(torch.cuda.device_count()),
        **common,
    )


def _cpu_model() -> str:
    """The CPU model name, the CPU part of the environment key.

    ``platform.processor()`` merges different CPUs under one key (``arm`` on every Apple machine,
    ``aarch64`` on every ARM server), so: the ``model name`` of /proc/cpuinfo where it has one (x86
    Linux: the very string py-cpuinfo reports, read without its ~1 s probe, so keys recorded before
    stay the same), else py-cpuinfo's ``brand_raw`` (Apple M-series, ARM servers, Windows), else
    ``platform`` as a last resort.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                name, sep, value = line.partition(":")
                if sep and name.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    brand = _cpuinfo_brand()
    if brand:
        return brand
    return " ".join((_platform.processor() or _platform.machine() or "unknown cpu").split())


_CPUINFO_BRAND: list[str] = []


def _cpuinfo_brand() -> str:
    """py-cpuinfo's brand string, asked once per process (it probes for about a second)."""
    if not _CPUINFO_BRAND:
        try:
            import cpuinfo

            _CPUINFO_BRAND.append(" ".join(str(cpuinfo.get_cpu_info().get("brand_raw") or "").split()))
        except Exception:  # not installed, or a platform it cannot probe: fall back
            _CPUINFO_BRAND.append("")
    return _CPUINFO_BRAND[0]


_SHORT_GPU_CUT = re.compile(r"[\s-](?:SXM\d*|PCIE|PCIe|\d+\s*GB)\b.*$")


def _short_gpu_name(name: str) -> str:
    """Drop form factor and memory size: "NVIDIA A100-SXM4-80GB" -> "NVIDIA A100"."""
    short = _SHORT_GPU_CUT.sub("", name).strip()
    return short or name


def _key_part(text: str) -> str:
    """Printable ASCII only, no quote, backslash or key separator, whitespace collapsed."""
    cleaned = "".join(ch if (" " <= ch <= "~" and ch not in '"\\' + _KEY_SEPARATOR) else " " for ch in str(text))
    return " ".join(cleaned.split()) or "unknown"


def _major_minor(version: str) -> str:
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return f"{match.group(1)}.{match.group(2)}" if match else _key_part(str(version))


def _major(version: str) -> str:
    match = re.match(r"\s*(\d+)", str(version))
    return match.group(1) if match else _key_part(str(version))


def _require(data: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(data, Mapping):
        raise BaselineError(f"stored {what} must be a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise BaselineError(f"stored {what} lacks {', '.join(repr(k) for k in missing)}; re-record it with --ampgate-update")


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
