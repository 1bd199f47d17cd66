"""The known global state every measurement starts from, and what a test leaked into it.

torch keeps precision switches in process-global (thread-local) state: an autocast region, the
grad mode, the default dtype, a default device.  A test that enters ``torch.autocast`` and never
leaves, or wraps ``ampgate.run()`` in ``torch.no_grad()``, or calls ``torch.set_default_dtype``
without restoring it, would otherwise change what the *next* measurement means: the fp32
reference silently runs in bfloat16 and is recorded as the baseline, or every mode fails and AMP
is blamed.  So :func:`measured_from_known_state` runs the measurement with the state reset (autocast
off on every device, grad enabled, inference mode off, float32 default dtype, CPU default device;
TF32 is pinned per mode by ``precision_policy.numerics_policy``), restores the caller's state afterwards, and
names what it found in the result instead of measuring on it.

Nothing here imports pytest, and torch only once a measurement runs: the gate reads
:data:`LEAKED_KEY` and :func:`describe` when judging a stored result, without torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LEAKED_KEY = "leaked_state"
"""Where :func:`measured_from_known_state` notes what it found: ``Measurements.environment[LEAKED_KEY]``."""

AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_enabled(device_type: str) -> bool:
    import torch

    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # torch < 2.4 or a device type this build does not know
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else False


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    import torch

    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4
        return None


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def leaked_state(device_type: str = "cpu") -> list[str]:
    """What differs from the known state now, one phrase each (empty when nothing does)."""
    import torch

    found = []
    for dev in dict.fromkeys((*AUTOCAST_DEVICES, device_type)):
        if _autocast_enabled(dev):
            dtype = _autocast_dtype(dev)
            found.append(f"torch.autocast({dev!r}{', ' + _dtype_name(dtype) if dtype else ''}) left enabled")
    if not torch.is_grad_enabled():
        found.append("gradients disabled (torch.no_grad() or torch.set_grad_enabled(False) left active)")
    if torch.is_inference_mode_enabled():
        found.append("torch.inference_mode() left active")
    if torch.is_anomaly_enabled():  # turns the inf/NaN gradients GradScaler skips into errors, and slows every op
        found.append("torch.autograd.set_detect_anomaly(True) left on")
    if torch.get_default_dtype() != torch.float32:
        found.append(f"torch.set_default_dtype({_dtype_name(torch.get_default_dtype())}) left set (expected float32)")
    get_device = getattr(torch, "get_default_device", None)  # torch >= 2.3
    if get_device is not None and get_device().type != "cpu":
        found.append(f"torch.set_default_device({str(get_device())!r}) left set (expected cpu)")
    return found


@contextmanager
def known_state(device_type: str = "cpu") -> Iterator[list[str]]:
    """Run the body from the known state; yields what was leaked; restores the caller's state after."""
    import torch

    found = leaked_state(device_type)
    dtype = torch.get_default_dtype()
    get_device = getattr(torch, "get_default_device", None)
    default_device = get_device() if get_device is not None else None
    with ExitStack() as stack:
        for dev in dict.fromkeys((*AUTOCAST_DEVICES, device_type)):
            if _autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if torch.is_anomaly_enabled():
            stack.enter_context(torch.autograd.set_detect_anomaly(False))
        _outside_autocast_regions(stack)
        if default_device is not None and default_device.type != "cpu":
            torch.set_default_device("cpu")
            stack.callback(torch.set_default_device, default_device)
        if dtype != torch.float32:
            torch.set_default_dtype(torch.float32)
            stack.callback(torch.set_default_dtype, dtype)
        yield found


def _outside_autocast_regions(stack: ExitStack) -> None:
    """Measure at autocast nesting depth 0, restoring the caller's depth afterwards.

    autocast caches its casts of leaf tensors (the weights) and drops that cache only when the
    outermost region exits.  Inside a region a test left open (or one wrapping ``run()``), a mode's
    own ``torch.autocast`` is not outermost, so the weights' low-precision copies made at the first
    step would be reused after every optimizer step: the model would train on stale weights and
    that would be measured (and recorded) as the AMP mode's accuracy.
    """
    import torch

    depth = 0
    while torch.autocast_decrement_nesting() >= 0:
        depth += 1
    torch.autocast_increment_nesting()  # the probe went one below zero
    if depth == 0:
        return
    torch.clear_autocast_cache()

    def restore() -> None:
        torch.clear_autocast_cache()
        for _ in range(depth):
            torch.autocast_increment_nesting()

    stack.callback(restore)


def describe(found: list[str]) -> str:
    """The one line a verdict shows for leaked state."""
    return (
        "global torch state was leaked into this measurement (by this test or an earlier one): "
        + "; ".join(found)
        + ". It was reset for measuring (autocast off, grad on, float32) and restored afterwards; "
        "find the test that leaves it set"
    )


def measured_from_known_state(measure: Callable) -> Callable:
    """Decorate ``measurement.measure``: measure from the known state, note any leak in the result."""

    @functools.wraps(measure)
    def wrapper(*args, **kwargs):
        device_type = str(kwargs.get("device", "cuda")).split(":")[0]
        with known_state(device_type) as found:
            result = measure(*args, **kwargs)
        if found:
            result.environment = {**result.environment, LEAKED_KEY: list(found)}
        return result

    return wrapper
