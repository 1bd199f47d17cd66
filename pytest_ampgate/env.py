"""Where a measurement was taken, and whether the GPU was quiet enough to trust it.

AMP's benefit is a property of the hardware and the software stack as much as of the model: a new GPU
generation, a PyTorch minor release or a CUDA major release can each switch tensor-core kernels on or
off. So a stored baseline is only comparable with a measurement from the same environment, and every
report says which environment it came from. :func:`fingerprint` records that environment;
:meth:`Environment.key` is the part of it that baselines are keyed by.

A timing is also only as good as the GPU was idle: another process on the same GPU, or clocks held
back by a power or thermal limit, makes a step slower for reasons the code under test did not cause.
:func:`noise_report` reads those conditions from NVML so a verdict can say it was measured on a
noisy GPU instead of blaming the model. NVML is advisory: every failure there degrades to "not
available", never to an exception or a warning.

Everything here is a plain frozen dataclass with ``to_dict()`` / ``from_dict()`` so that it can be
written into baseline files and JSON reports as is.
"""

from __future__ import annotations

import os
import platform as _platform
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch

from .errors import BaselineError, ConfigError

__all__ = [
    "Environment",
    "GpuProcess",
    "NoiseReport",
    "TF32Policy",
    "current_tf32_policy",
    "fingerprint",
    "noise_report",
]

DeviceLike = Union[str, "torch.device", int, None]


# --------------------------------------------------------------------------------------------------
# TF32 policy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TF32Policy:
    """The float32 matmul / convolution precision in force, exactly as torch reports it.

    On Ampere and later, "FP32" matmuls and convolutions may silently run in TF32, so an "FP32"
    baseline is only meaningful together with this policy. ``matmul`` and ``cudnn_conv`` are the
    strings torch reports: ``"ieee"`` (true float32), ``"tf32"``, or with the torch >= 2.9 API
    ``"none"``, meaning nothing in the precision hierarchy was set and torch's default applies
    (IEEE for cuBLAS matmul). ``api`` names the API the values were read from:
    ``"fp32_precision"`` (torch >= 2.9) or ``"allow_tf32"`` (older torch, mapped to "tf32"/"ieee").
    """

    matmul: str
    cudnn_conv: str
    api: str

    @property
    def matmul_tf32(self) -> bool:
        """Whether float32 matmuls may use TF32 tensor cores ("none" inherits IEEE by default)."""
        return self.matmul == "tf32"

    @property
    def cudnn_conv_tf32(self) -> bool:
        """Whether float32 cuDNN convolutions may use TF32 tensor cores."""
        return self.cudnn_conv == "tf32"

    def describe(self) -> str:
        """One line for reports, e.g. ``"matmul ieee, cudnn conv tf32"``."""
        return f"matmul {self.matmul}, cudnn conv {self.cudnn_conv}"

    def to_dict(self) -> dict:
        return {"matmul": self.matmul, "cudnn_conv": self.cudnn_conv, "api": self.api}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TF32Policy:
        _require(data, ("matmul", "cudnn_conv", "api"), "TF32 policy")
        return cls(matmul=str(data["matmul"]), cudnn_conv=str(data["cudnn_conv"]), api=str(data["api"]))


def _read_fp32_precision(obj: Any) -> str | None:
    """``obj.fp32_precision`` if this torch has the new API there, else None.

    Older torch raises AttributeError from these modules' ``__getattr__``; anything else going wrong
    also means "not usable", never an error for the caller.
    """
    if obj is None:
        return None
    try:
        value = obj.fp32_precision
    except Exception:
        return None
    return value if isinstance(value, str) else None


def current_tf32_policy() -> TF32Policy:
    """Read the global TF32 policy without changing it, warning, or mixing APIs.

    torch >= 2.9 raises "mix of the legacy and new APIs" when ``allow_tf32`` or
    ``get_float32_matmul_precision()`` is read after the new ``fp32_precision`` API was used, and its
    legacy setters warn, so where the new API exists only it is read. Older torch only has the legacy
    ``allow_tf32`` booleans, which are mapped to ``"tf32"`` / ``"ieee"``. No CUDA call is made.
    """
    backends = torch.backends
    matmul_module = getattr(getattr(backends, "cuda", None), "matmul", None)
    cudnn_module = getattr(backends, "cudnn", None)
    new_matmul = _read_fp32_precision(matmul_module)
    new_conv = _read_fp32_precision(getattr(cudnn_module, "conv", None))
    if new_matmul is not None and new_conv is not None:
        return TF32Policy(matmul=new_matmul, cudnn_conv=new_conv, api="fp32_precision")
    return TF32Policy(
        matmul=_legacy_flag(matmul_module),
        cudnn_conv=_legacy_flag(cudnn_module),
        api="allow_tf32",
    )


def _legacy_flag(module: Any) -> str:
    try:
        allowed = module.allow_tf32
    except Exception:
        return "unknown"
    if allowed is True:
        return "tf32"
    if allowed is False:
        return "ieee"
    return "unknown"


# --------------------------------------------------------------------------------------------------
# Environment fingerprint
# --------------------------------------------------------------------------------------------------

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

    def to_dict(self) -> dict:
        return {
            "device_type": self.device_type,
            "device_name": self.device_name,
            "compute_capability": self.compute_capability,
            "bf16_supported": self.bf16_supported,
            "torch_version": self.torch_version,
            "cuda_version": self.cuda_version,
            "cudnn_version": self.cudnn_version,
            "driver_version": self.driver_version,
            "gpu_count": self.gpu_count,
            "tf32": self.tf32.to_dict(),
            "python_version": self.python_version,
            "platform": self.platform,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Environment:
        """Inverse of :meth:`to_dict`. Unknown keys are ignored so newer files stay readable."""
        _require(
            data,
            ("device_type", "device_name", "bf16_supported", "torch_version", "gpu_count", "tf32"),
            "environment",
        )
        tf32 = data["tf32"]
        if not isinstance(tf32, Mapping):
            raise BaselineError(f"environment field 'tf32' must be an object, got {type(tf32).__name__}")
        cudnn = data.get("cudnn_version")
        return cls(
            device_type=str(data["device_type"]),
            device_name=str(data["device_name"]),
            compute_capability=_opt_str(data.get("compute_capability")),
            bf16_supported=bool(data["bf16_supported"]),
            torch_version=str(data["torch_version"]),
            cuda_version=_opt_str(data.get("cuda_version")),
            cudnn_version=None if cudnn is None else int(cudnn),
            driver_version=_opt_str(data.get("driver_version")),
            gpu_count=int(data["gpu_count"]),
            tf32=TF32Policy.from_dict(tf32),
            python_version=str(data.get("python_version", "")),
            platform=str(data.get("platform", "")),
        )


def fingerprint(device: DeviceLike = None) -> Environment:
    """Fingerprint the environment a measurement on ``device`` runs in.

    ``device`` is ``"cuda"``, ``"cuda:1"``, ``"cpu"``, a ``torch.device``, a CUDA index, or None for
    the current CUDA device when there is one and the CPU otherwise. A CPU fingerprint makes no CUDA
    calls (it must work on machines without a GPU and must not create a CUDA context). Asking for a
    CUDA device that is not there is a :class:`~pytest_ampgate.errors.ConfigError`: silently falling
    back to the CPU would file the measurement under the wrong baseline key.
    """
    device_type, index = _parse_device(device)
    common = dict(
        torch_version=str(torch.__version__),
        cuda_version=_opt_str(getattr(torch.version, "cuda", None)),
        tf32=current_tf32_policy(),
        python_version=_platform.python_version(),
        platform=_platform.platform(),
    )
    if device_type != "cuda":
        return Environment(
            device_type=device_type,
            device_name=_cpu_model(),
            compute_capability=None,
            bf16_supported=True,
            cudnn_version=None,
            driver_version=None,
            gpu_count=0,
            **common,
        )

    index = _cuda_index(index)
    props = torch.cuda.get_device_properties(index)
    try:
        cudnn_version = torch.backends.cudnn.version()
    except Exception:
        cudnn_version = None
    return Environment(
        device_type="cuda",
        device_name=str(props.name),
        compute_capability=f"{props.major}.{props.minor}",
        bf16_supported=_cuda_bf16_supported(index),
        cudnn_version=None if cudnn_version is None else int(cudnn_version),
        driver_version=_nvml_driver_version(),
        gpu_count=int(torch.cuda.device_count()),
        **common,
    )


def _cuda_bf16_supported(index: int) -> bool:
    """Native bf16 on this device; emulated bf16 (pre-Ampere) runs but brings AMP no speedup.

    Newer torch answers True for emulated bf16 unless ``including_emulation=False`` is passed, and
    answers for the *current* device, hence the device context.
    """
    try:
        with torch.cuda.device(index):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch without the including_emulation parameter
                return bool(torch.cuda.is_bf16_supported())
    except Exception:
        return False


def _parse_device(device: DeviceLike) -> tuple[str, int | None]:
    if device is None:
        return ("cuda", None) if torch.cuda.is_available() else ("cpu", None)
    if isinstance(device, bool):
        raise ConfigError(f"device must be 'cuda', 'cuda:N', 'cpu' or a torch.device, got {device!r}")
    if isinstance(device, int):
        return "cuda", device
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device must be 'cuda', 'cuda:N', 'cpu' or a torch.device, got {device!r} ({exc})") from None
    return dev.type, dev.index


def _cuda_index(index: int | None) -> int:
    if not torch.cuda.is_available():
        raise ConfigError(
            "a CUDA device was asked for but none is visible to torch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use device='cpu' or run on a machine with an NVIDIA GPU"
        )
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()
    if not 0 <= index < count:
        raise ConfigError(f"CUDA device {index} asked for, but only {count} visible (cuda:0..cuda:{count - 1})")
    return index


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


_CPUINFO_BRAND: list = []


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


# --------------------------------------------------------------------------------------------------
# NVML noise indicators
# --------------------------------------------------------------------------------------------------

# Clock-event reasons that make a step slower than the code alone would: (name, new constant,
# old constant, the bit NVML documents). Benign reasons (gpu_idle, applications_clocks_setting,
# display_clock_setting, sync_boost, user_defined_clocks) are deliberately absent.
_DISTORTING_REASONS = (
    ("sw_power_cap", "nvmlClocksEventReasonSwPowerCap", "nvmlClocksThrottleReasonSwPowerCap", 0x4),
    ("hw_slowdown", "nvmlClocksEventReasonHwSlowdown", "nvmlClocksThrottleReasonHwSlowdown", 0x8),
    ("sw_thermal_slowdown", "nvmlClocksEventReasonSwThermalSlowdown", "nvmlClocksThrottleReasonSwThermalSlowdown", 0x20),
    ("hw_thermal_slowdown", "nvmlClocksEventReasonHwThermalSlowdown", "nvmlClocksThrottleReasonHwThermalSlowdown", 0x40),
    ("hw_power_brake_slowdown", "nvmlClocksEventReasonHwPowerBrakeSlowdown", "nvmlClocksThrottleReasonHwPowerBrakeSlowdown", 0x80),
)

CPU_REASON = "timing on the CPU; NVML applies to NVIDIA GPUs only"
NO_CUDA_REASON = "no CUDA device"


@dataclass(frozen=True)
class GpuProcess:
    """Another compute process on the GPU being timed: it competes for SMs and memory bandwidth."""

    pid: int
    used_memory_bytes: int | None = None
    name: str | None = None

    def to_dict(self) -> dict:
        return {"pid": self.pid, "used_memory_bytes": self.used_memory_bytes, "name": self.name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuProcess:
        _require(data, ("pid",), "GPU process")
        mem = data.get("used_memory_bytes")
        return cls(pid=int(data["pid"]), used_memory_bytes=None if mem is None else int(mem), name=_opt_str(data.get("name")))


@dataclass(frozen=True)
class NoiseReport:
    """How far the GPU was from quiet when it was checked, as NVML saw it.

    ``available`` is False (with ``reason``) when NVML could not be read for this device; the other
    fields are then empty. Individual readings NVML refuses (common on consumer GPUs, in containers,
    under MIG) are None, and the names of refused lists are in ``unreadable``.

    In a container with its own PID namespace NVML reports host PIDs, so this process cannot be
    recognised by PID. When this process holds a CUDA context and its PID is not in NVML's list,
    ``own_process_unidentified`` is True and one of ``other_processes`` is presumed to be this one.
    """

    available: bool
    reason: str = ""
    other_processes: tuple[GpuProcess, ...] = ()
    throttle_reasons: tuple[str, ...] = ()
    sm_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    temperature_c: int | None = None
    utilization_percent: int | None = None
    own_process_unidentified: bool = False
    unreadable: tuple[str, ...] = ()

    @property
    def other_process_count(self) -> int:
        """Processes that are certainly not this one (see ``own_process_unidentified``)."""
        return max(0, len(self.other_processes) - (1 if self.own_process_unidentified else 0))

    @property
    def noisy(self) -> bool:
        """Other processes share the GPU, or its clocks are held back by power or temperature."""
        return self.available and (self.other_process_count > 0 or bool(self.throttle_reasons))

    def describe(self) -> str:
        """One line for reports: what makes the GPU noisy, ``"quiet"``, or why NVML is unavailable."""
        if not self.available:
            return f"NVML not available: {self.reason}"
        parts = []
        count = self.other_process_count
        if count:
            pids = ", ".join(str(p.pid) for p in self.other_processes)
            noun = "process" if count == 1 else "processes"
            note = "; one of them is presumably this process under a host PID" if self.own_process_unidentified else ""
            parts.append(f"GPU shared with {count} other {noun} (pids {pids}{note})")
        if self.throttle_reasons:
            parts.append("clocks held back by " + ", ".join(self.throttle_reasons))
        line = "; ".join(parts) if parts else "quiet"
        if self.unreadable:
            line += f" (NVML could not read: {', '.join(self.unreadable)})"
        return line

    def to_dict(self) -> dict:
        return {
            "available": self.available,
            "reason": self.reason,
            "other_processes": [p.to_dict() for p in self.other_processes],
            "throttle_reasons": list(self.throttle_reasons),
            "sm_clock_mhz": self.sm_clock_mhz,
            "max_sm_clock_mhz": self.max_sm_clock_mhz,
            "temperature_c": self.temperature_c,
            "utilization_percent": self.utilization_percent,
            "own_process_unidentified": self.own_process_unidentified,
            "unreadable": list(self.unreadable),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NoiseReport:
        _require(data, ("available",), "noise report")
        return cls(
            available=bool(data["available"]),
            reason=str(data.get("reason", "")),
            other_processes=tuple(GpuProcess.from_dict(p) for p in data.get("other_processes", ())),
            throttle_reasons=tuple(str(r) for r in data.get("throttle_reasons", ())),
            sm_clock_mhz=_opt_int(data.get("sm_clock_mhz")),
            max_sm_clock_mhz=_opt_int(data.get("max_sm_clock_mhz")),
            temperature_c=_opt_int(data.get("temperature_c")),
            utilization_percent=_opt_int(data.get("utilization_percent")),
            own_process_unidentified=bool(data.get("own_process_unidentified", False)),
            unreadable=tuple(str(r) for r in data.get("unreadable", ())),
        )


def noise_report(device: DeviceLike = "cuda") -> NoiseReport:
    """Check the GPU that ``device`` names for other processes and held-back clocks.

    Never raises and never warns: a missing pynvml, a failing ``nvmlInit`` or an unmappable device
    gives ``available=False`` with the reason; a single refused reading gives None for that field.
    """
    try:
        device_type, index = _parse_device(device)
    except ConfigError as exc:
        return NoiseReport(available=False, reason=str(exc))
    if device_type != "cuda":
        return NoiseReport(available=False, reason=CPU_REASON)
    try:
        if not torch.cuda.is_available():
            return NoiseReport(available=False, reason=NO_CUDA_REASON)
        count = torch.cuda.device_count()
        if index is None:
            index = torch.cuda.current_device()
        if not 0 <= index < count:
            return NoiseReport(available=False, reason=f"{NO_CUDA_REASON} {index} (only {count} visible)")
        props = torch.cuda.get_device_properties(index)
        own_context = bool(torch.cuda.is_initialized())
    except Exception as exc:
        return NoiseReport(available=False, reason=f"CUDA device query failed: {exc}")

    pynvml = _import_pynvml()
    if pynvml is None:
        return NoiseReport(available=False, reason="pynvml not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return NoiseReport(available=False, reason=f"NVML init failed: {_err(exc)}")
    try:
        handle, why = _nvml_handle(pynvml, props, index)
        if handle is None:
            return NoiseReport(available=False, reason=why)
        return _read_noise(pynvml, handle, own_context)
    except Exception as exc:  # a pynvml bug must not take the gate down with it
        return NoiseReport(available=False, reason=f"NVML query failed: {_err(exc)}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _import_pynvml() -> Any:
    """pynvml, imported lazily; the deprecated ``pynvml`` shim package warns on import, so hush it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
    except Exception:
        return None
    return pynvml


def _nvml_handle(pynvml: Any, props: Any, index: int) -> tuple[Any, str]:
    """The NVML handle of the GPU torch calls ``index``.

    torch's indices follow CUDA_VISIBLE_DEVICES and CUDA's ordering, NVML's do not, so match by
    UUID first, then by PCI bus id, and trust the index only as a last resort.
    """
    errors = []
    uuid = getattr(props, "uuid", None)
    if uuid is not None and hasattr(pynvml, "nvmlDeviceGetHandleByUUID"):
        text = str(uuid)
        candidates = [text] if text.startswith(("GPU-", "MIG-")) else ["GPU-" + text, "MIG-" + text]
        for candidate in candidates:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(candidate), ""
            except Exception as exc:
                errors.append(f"uuid {candidate}: {_err(exc)}")
    pci = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if all(isinstance(v, int) for v in pci) and hasattr(pynvml, "nvmlDeviceGetHandleByPciBusId"):
        bus_id = "{:08X}:{:02X}:{:02X}.0".format(*pci)
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), ""
        except Exception as exc:
            errors.append(f"pci {bus_id}: {_err(exc)}")
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(index), ""
    except Exception as exc:
        errors.append(f"index {index}: {_err(exc)}")
    return None, "NVML has no handle for this GPU (" + "; ".join(errors) + ")"


def _read_noise(pynvml: Any, handle: Any, own_context: bool) -> NoiseReport:
    unreadable = []

    own_pid = os.getpid()
    processes, err = _try(pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
    others = []
    own_seen = False
    if err is not None:
        unreadable.append("processes")
    else:
        for proc in processes or ():
            pid = int(getattr(proc, "pid", -1))
            if pid == own_pid:
                own_seen = True
                continue
            mem = getattr(proc, "usedGpuMemory", None)
            others.append(GpuProcess(pid=pid, used_memory_bytes=mem if isinstance(mem, int) else None, name=_process_name(pynvml, pid)))
    own_unidentified = bool(own_context and not own_seen and others)

    throttle = ()
    getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    mask, err = _try(getter, handle) if getter is not None else (None, "missing")
    if err is not None or not isinstance(mask, int):
        unreadable.append("clock event reasons")
    else:
        throttle = _decode_reasons(pynvml, mask)

    sm_const = getattr(pynvml, "NVML_CLOCK_SM", 1)
    sm_clock, _ = _try(getattr(pynvml, "nvmlDeviceGetClockInfo", None), handle, sm_const)
    max_sm, _ = _try(getattr(pynvml, "nvmlDeviceGetMaxClockInfo", None), handle, sm_const)
    temp, _ = _try(getattr(pynvml, "nvmlDeviceGetTemperature", None), handle, getattr(pynvml, "NVML_TEMPERATURE_GPU", 0))
    util, _ = _try(getattr(pynvml, "nvmlDeviceGetUtilizationRates", None), handle)

    return NoiseReport(
        available=True,
        reason="",
        other_processes=tuple(others),
        throttle_reasons=throttle,
        sm_clock_mhz=_opt_int(sm_clock),
        max_sm_clock_mhz=_opt_int(max_sm),
        temperature_c=_opt_int(temp),
        utilization_percent=_opt_int(getattr(util, "gpu", None)),
        own_process_unidentified=own_unidentified,
        unreadable=tuple(unreadable),
    )


def _decode_reasons(pynvml: Any, mask: int) -> tuple[str, ...]:
    names = []
    for name, new_const, old_const, documented in _DISTORTING_REASONS:
        bit = getattr(pynvml, new_const, None)
        if not isinstance(bit, int):
            bit = getattr(pynvml, old_const, None)
        if not isinstance(bit, int):
            bit = documented
        if mask & bit:
            names.append(name)
    return tuple(names)


def _process_name(pynvml: Any, pid: int) -> str | None:
    """The process's name from NVML (sees host PIDs) or /proc; None when neither can tell."""
    name, err = _try(getattr(pynvml, "nvmlSystemGetProcessName", None), pid)
    if err is None and name:
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        return os.path.basename(text.strip()) or None
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _nvml_driver_version() -> str | None:
    pynvml = _import_pynvml()
    if pynvml is None:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        version, err = _try(getattr(pynvml, "nvmlSystemGetDriverVersion", None))
        if err is not None or version is None:
            return None
        return version.decode("ascii", "replace") if isinstance(version, bytes) else str(version)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _try(fn: Any, *args: Any) -> tuple[Any, str | None]:
    """Call an NVML function; (result, None) or (None, why). NVML refusals are normal, not errors."""
    if fn is None:
        return None, "not in this pynvml"
    try:
        return fn(*args), None
    except Exception as exc:
        return None, _err(exc)


def _err(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _require(data: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(data, Mapping):
        raise BaselineError(f"stored {what} must be a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise BaselineError(f"stored {what} lacks {', '.join(repr(k) for k in missing)}; re-record it with --ampgate-update")


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# noise during the timed window
# --------------------------------------------------------------------------------------------------

# NVML violation counters (cumulative nanoseconds a limit held the clocks back): (name, constant, value).
_VIOLATION_POLICIES = (
    ("power", "NVML_PERF_POLICY_POWER", 0),
    ("thermal", "NVML_PERF_POLICY_THERMAL", 1),
    ("reliability", "NVML_PERF_POLICY_RELIABILITY", 5),
)
THROTTLE_SHARE = 0.01
"""Clocks held back for at least this share of the timed window make its timings untrustworthy."""
BUSY_PERCENT = 1
"""A process whose SM or memory utilisation reached this many percent during the window used the GPU."""


@dataclass(frozen=True)
class BusyProcess:
    """Another process that used the GPU while this one timed it: NVML's per-process utilisation."""

    pid: int
    sm_percent: int
    memory_percent: int
    name: str | None = None

    def to_dict(self) -> dict:
        return {"pid": self.pid, "sm_percent": self.sm_percent, "memory_percent": self.memory_percent, "name": self.name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BusyProcess:
        _require(data, ("pid",), "busy GPU process")
        return cls(int(data["pid"]), int(data.get("sm_percent", 0)), int(data.get("memory_percent", 0)), _opt_str(data.get("name")))


@dataclass(frozen=True)
class WindowNoise:
    """What disturbed the GPU during the timed rounds, as NVML counted it over that window.

    Only processes that *used* the GPU during the window count (per-process utilisation samples
    since the window began), never this run's own processes (its xdist workers hold CUDA contexts
    but wait for the device lock).  Throttling is read from NVML's cumulative violation counters
    at both ends of the window, so a limit that held the clocks back in the middle is seen even if
    it was gone when the window ended.
    """

    available: bool
    reason: str = ""
    window_s: float = 0.0
    busy_processes: tuple[BusyProcess, ...] = ()
    throttled_s: Mapping[str, float] = None  # type: ignore[assignment]
    ignored_own_pids: tuple[int, ...] = ()
    unreadable: tuple[str, ...] = ()

    @property
    def throttle(self) -> dict:
        return {k: v for k, v in (self.throttled_s or {}).items() if self.window_s > 0 and v / self.window_s >= THROTTLE_SHARE}

    @property
    def noisy(self) -> bool:
        return self.available and (bool(self.busy_processes) or bool(self.throttle))

    def describe(self) -> str:
        if not self.available:
            return f"NVML not available: {self.reason}"
        parts = []
        if self.busy_processes:
            who = ", ".join(
                f"pid {p.pid}{' ' + p.name if p.name else ''} (SM {p.sm_percent}%, memory {p.memory_percent}%)" for p in self.busy_processes
            )
            parts.append(
                f"{len(self.busy_processes)} other process{'es' if len(self.busy_processes) > 1 else ''} used the GPU during the timed rounds: {who}"
            )
        for name, seconds in self.throttle.items():
            parts.append(f"clocks held back by the {name} limit for {seconds:.2f} s of the {self.window_s:.2f} s window")
        line = "; ".join(parts) if parts else "quiet during the timed rounds"
        if self.unreadable:
            line += f" (NVML could not read: {', '.join(self.unreadable)})"
        return line

    def to_dict(self) -> dict:
        return {
            "available": self.available,
            "reason": self.reason,
            "window_s": self.window_s,
            "busy_processes": [p.to_dict() for p in self.busy_processes],
            "throttled_s": dict(self.throttled_s or {}),
            "ignored_own_pids": list(self.ignored_own_pids),
            "unreadable": list(self.unreadable),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowNoise:
        _require(data, ("available",), "noise window")
        return cls(
            available=bool(data["available"]),
            reason=str(data.get("reason", "")),
            window_s=float(data.get("window_s", 0.0)),
            busy_processes=tuple(BusyProcess.from_dict(p) for p in data.get("busy_processes", ())),
            throttled_s={str(k): float(v) for k, v in (data.get("throttled_s") or {}).items()},
            ignored_own_pids=tuple(int(p) for p in data.get("ignored_own_pids", ())),
            unreadable=tuple(str(r) for r in data.get("unreadable", ())),
        )


def own_run_pids() -> set:
    """This process and the other processes of the same pytest run (its xdist workers and controller).

    pytest-xdist gives every worker of one run the same ``PYTEST_XDIST_TESTRUNUID``; processes
    whose environment carries ours (readable for processes of the same user) are this run's.
    Without xdist, only this process.
    """
    pids = {os.getpid()}
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not uid:
        return pids
    pids.add(os.getppid())  # the controller
    needle = f"PYTEST_XDIST_TESTRUNUID={uid}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


class NoiseWindow:
    """Open at the start of the timed rounds, :meth:`close` at their end: what disturbed the GPU in between."""

    def __init__(self, pynvml: Any = None, handle: Any = None, reason: str = "", own_pids: set | None = None):
        self.pynvml, self.handle, self.reason = pynvml, handle, reason
        self.own_pids = own_pids
        self.started = time.perf_counter()
        self.since_us = int(time.time() * 1e6)
        self.counters = _violations(pynvml, handle)[0] if handle is not None else {}

    def close(self) -> WindowNoise:
        if self.handle is None:
            return WindowNoise(available=False, reason=self.reason)
        try:
            return self._read()
        except Exception as exc:  # a pynvml bug must not take the gate down with it
            return WindowNoise(available=False, reason=f"NVML query failed: {_err(exc)}")
        finally:
            if self.pynvml is not None:
                try:
                    self.pynvml.nvmlShutdown()
                except Exception:
                    pass

    def _read(self) -> WindowNoise:
        pynvml, handle = self.pynvml, self.handle
        window_s = time.perf_counter() - self.started
        unreadable = []
        own = self.own_pids if self.own_pids is not None else own_run_pids()
        samples, err = _try(getattr(pynvml, "nvmlDeviceGetProcessUtilization", None), handle, self.since_us)
        busy: dict = {}
        ignored = set()
        # NVML answers "not found" (pynvml sometimes raises "Success") when no process has a
        # sample since the timestamp: nobody used the GPU.
        if err is not None and "not found" not in err.lower() and "success" not in err.lower():
            unreadable.append("per-process utilisation")
        for sample in samples or ():
            pid = int(getattr(sample, "pid", -1))
            sm, mem = int(getattr(sample, "smUtil", 0) or 0), int(getattr(sample, "memUtil", 0) or 0)
            stamp = int(getattr(sample, "timeStamp", self.since_us + 1) or 0)
            if stamp <= self.since_us or max(sm, mem) < BUSY_PERCENT:
                continue
            if pid in own:
                ignored.add(pid)
                continue
            old = busy.get(pid, (0, 0))
            busy[pid] = (max(old[0], sm), max(old[1], mem))
        after, bad = _violations(pynvml, handle)
        unreadable += bad
        throttled = {name: max(0.0, (after[name] - self.counters[name]) / 1e9) for name in after if name in self.counters}
        return WindowNoise(
            available=True,
            window_s=window_s,
            busy_processes=tuple(BusyProcess(pid, sm, mem, _process_name(pynvml, pid)) for pid, (sm, mem) in sorted(busy.items())),
            throttled_s=throttled,
            ignored_own_pids=tuple(sorted(ignored)),
            unreadable=tuple(unreadable),
        )


def _violations(pynvml: Any, handle: Any) -> tuple[dict, list]:
    """NVML's cumulative violation time (ns) per clock-limiting policy; unreadable policies left out."""
    getter = getattr(pynvml, "nvmlDeviceGetViolationStatus", None)
    counters, bad = {}, []
    for name, const, value in _VIOLATION_POLICIES:
        status, err = _try(getter, handle, getattr(pynvml, const, value))
        reading = getattr(status, "violationTime", None) if err is None else None
        if isinstance(reading, int):
            counters[name] = reading
        elif name != "reliability":  # not on every GPU; its absence is normal
            bad.append(f"{name} violation counter")
    return counters, bad


def open_noise_window(device: DeviceLike = "cuda", *, pynvml: Any = None, own_pids: set | None = None) -> NoiseWindow:
    """Start watching the GPU ``device`` names (cuda:N follows N); never raises.

    ``pynvml`` replaces the NVML bindings (tests pass a fake one; the device is then its index).
    """
    try:
        device_type, index = _parse_device(device)
    except ConfigError as exc:
        return NoiseWindow(reason=str(exc))
    if pynvml is not None:
        try:
            return NoiseWindow(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index or 0), own_pids=own_pids)
        except Exception as exc:
            return NoiseWindow(reason=f"NVML has no handle for this GPU: {_err(exc)}")
    if device_type != "cuda":
        return NoiseWindow(reason=CPU_REASON)
    try:
        if not torch.cuda.is_available():
            return NoiseWindow(reason=NO_CUDA_REASON)
        if index is None:
            index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
    except Exception as exc:
        return NoiseWindow(reason=f"CUDA device query failed: {exc}")
    nvml = _import_pynvml()
    if nvml is None:
        return NoiseWindow(reason="pynvml not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return NoiseWindow(reason=f"NVML init failed: {_err(exc)}")
    try:
        handle, why = _nvml_handle(nvml, props, index)
    except Exception as exc:
        handle, why = None, f"NVML query failed: {_err(exc)}"
    if handle is None:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
        return NoiseWindow(reason=why)
    return NoiseWindow(nvml, handle, own_pids=own_pids)
