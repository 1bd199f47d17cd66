"""NVML access that never fails loudly: import, init/shutdown, device handles, single readings.

NVML is advisory for the gate: a missing pynvml, a driver that refuses a query (common on consumer
GPUs, in containers, under MIG) or a bug in the bindings must degrade to "not available", never to
an exception or a warning.  Every NVML call of the package goes through these few helpers, so
that rule holds in one place for the fingerprint's driver version and for the noise readings, and
the GPU a torch device names is found in NVML one way (:func:`open_device`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .errors import ConfigError
from .modes import DeviceLike, cuda_index, device_missing_reason, parse_device

CPU_REASON = "timing on the CPU; NVML applies to NVIDIA GPUs only"
NO_CUDA_REASON = "no CUDA device"


def import_pynvml() -> Any:
    """pynvml, imported lazily, or None; the deprecated ``pynvml`` shim package warns on import, so hush it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
    except Exception:
        return None
    return pynvml


def shutdown(pynvml: Any) -> None:
    """Balance an ``nvmlInit``; a failing shutdown is nobody's business."""
    try:
        pynvml.nvmlShutdown()
    except Exception:
        pass


def call(fn: Any, *args: Any) -> tuple[Any, str | None]:
    """Call an NVML function; (result, None) or (None, why). NVML refusals are normal, not errors."""
    if fn is None:
        return None, "not in this pynvml"
    try:
        return fn(*args), None
    except Exception as exc:
        return None, error_text(exc)


def error_text(exc: BaseException) -> str:
    """What an NVML error says (pynvml's errors can fail to format themselves)."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__


def open_device(device: DeviceLike) -> tuple[Any, Any, str]:
    """(pynvml, handle, "") with NVML initialised for the GPU ``device`` names, or (None, None, why
    it cannot be read); the caller shuts NVML down.  Never raises: NVML is advisory."""
    try:
        dev = parse_device(device)
    except ConfigError as exc:
        return None, None, str(exc)
    if dev.type != "cuda":
        return None, None, CPU_REASON
    try:
        if device_missing_reason(dev):
            return None, None, NO_CUDA_REASON if dev.index is None else f"{NO_CUDA_REASON} {dev.index}"
        index = cuda_index(dev)
        props = torch.cuda.get_device_properties(index)
    except Exception as exc:
        return None, None, f"CUDA device query failed: {exc}"
    pynvml = import_pynvml()
    if pynvml is None:
        return None, None, "pynvml not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, None, f"NVML init failed: {error_text(exc)}"
    try:
        handle, why = handle_for(pynvml, props, index)
    except Exception as exc:
        handle, why = None, f"NVML query failed: {error_text(exc)}"
    if handle is None:
        shutdown(pynvml)
        return None, None, why
    return pynvml, handle, ""


def handle_for(pynvml: Any, props: Any, index: int) -> tuple[Any, str]:
    """The NVML handle of the GPU torch calls ``index``, or (None, why).

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
                errors.append(f"uuid {candidate}: {error_text(exc)}")
    pci = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if all(isinstance(v, int) for v in pci) and hasattr(pynvml, "nvmlDeviceGetHandleByPciBusId"):
        bus_id = "{:08X}:{:02X}:{:02X}.0".format(*pci)
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), ""
        except Exception as exc:
            errors.append(f"pci {bus_id}: {error_text(exc)}")
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(index), ""
    except Exception as exc:
        errors.append(f"index {index}: {error_text(exc)}")
    return None, "NVML has no handle for this GPU (" + "; ".join(errors) + ")"


def process_name(pynvml: Any, pid: int) -> str | None:
    """The process's name from NVML (sees host PIDs) or /proc; None when neither can tell."""
    name, err = call(getattr(pynvml, "nvmlSystemGetProcessName", None), pid)
    if err is None and name:
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        return os.path.basename(text.strip()) or None
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version as NVML reports it, or None where NVML cannot be read."""
    pynvml = import_pynvml()
    if pynvml is None:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        version, err = call(getattr(pynvml, "nvmlSystemGetDriverVersion", None))
        if err is not None or version is None:
            return None
        return version.decode("ascii", "replace") if isinstance(version, bytes) else str(version)
    finally:
        shutdown(pynvml)
