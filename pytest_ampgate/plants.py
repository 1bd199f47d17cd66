"""Planted regressions: workloads with a known defect of a known size, to prove the gate catches them.

A gate is only worth having if both of its answers can be trusted: it must pass unchanged code and
fail a real regression.  The second half cannot be shown with healthy workloads, so each function
here takes a :class:`~pytest_ampgate.workloads.Workload` and returns a copy carrying one of the
regressions AMP users meet in practice, with its size as a parameter:

* :func:`force_fp32_layer`: the largest layer runs under ``autocast(enabled=False)`` on ``.float()``
  inputs (the commonest silent AMP loss); fails ``precision_coverage``, naming the layer.
* :func:`slow_down`: each step of the named AMP modes takes ``fraction`` x its step time longer;
  fails ``speedup``.
* :func:`retain_activation`: an extra ``extra_bytes`` kept alive across the step of the named AMP
  modes; fails ``memory``.
* :func:`overflow_in_fp16`: a loss term (~1e5) that fits float32 and bfloat16 but not float16
  (max 65504); fails ``finite_loss`` in fp16 only.
* :func:`collapse_loss_scale`: a constant (1e5) in a layer's backward that float16 cannot hold, so
  every fp16 gradient is inf/NaN while the loss stays finite and GradScaler halves its scale every
  step; fails ``skipped_steps`` and ``loss_scale``.

The planted copy builds its model from the original factory (so every mode still starts from the
same weights as the unplanted workload), then changes it.  Plants that must act in some modes only
ask :func:`running_mode` inside the forward which mode is running: autocast's state and dtype tell
the AMP modes apart, the input's dtype the pure low-precision ones.  Per-copy state (the retained
tensor) lives on hook objects that ``copy.deepcopy`` copies with the model, so the modes of one
run never share it.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, WorkloadError
from .workloads import Workload, get_workload

AMP_MODES = ("amp_fp16", "amp_bf16")
COMPUTE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504


# --- which mode is running -----------------------------------------------------------------------


def running_mode(x: torch.Tensor | None = None, module: nn.Module | None = None) -> str:
    """The precision mode the current forward runs in, as :mod:`pytest_ampgate.modes` names them.

    AMP modes are told apart by autocast's state on the input's device; pure ``fp16``/``bf16`` by
    the input's (or, for integer inputs, the first parameter's) dtype; ``tf32`` by the TF32 switch
    that :func:`~pytest_ampgate.precision_policy.numerics_policy` sets for the step.
    """
    device_type = x.device.type if x is not None else "cpu"
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return {torch.float16: "amp_fp16", torch.bfloat16: "amp_bf16"}.get(dtype, f"amp_{dtype}")
    dtype = x.dtype if x is not None and x.is_floating_point() else None
    if dtype is None and module is not None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    if device_type == "cuda" and _tf32_on():
        return "tf32"
    return "fp32"


def _tf32_on() -> bool:
    from .precision_policy import current_tf32_policy

    return current_tf32_policy().matmul_tf32


def _first_tensor(args) -> torch.Tensor | None:
    return next((a for a in args if torch.is_tensor(a)), None)


# --- plumbing: a model factory that plants after building -----------------------------------------


class _PlantedFactory:
    """``model_factory`` of a planted workload: the original factory, then ``plant(model)``.

    A class rather than a closure so the planted workload reads well in reprs and error messages.
    """

    def __init__(self, factory: Callable[[], nn.Module], plant: Callable[[nn.Module], None], label: str):
        self.factory, self.plant, self.label = factory, plant, label

    def __call__(self) -> nn.Module:
        model = self.factory()
        self.plant(model)
        return model

    def __repr__(self) -> str:
        return f"{self.label} on {getattr(self.factory, '__qualname__', self.factory)!r}"


def _planted(workload: Workload, label: str, *, plant=None, loss_fn=None) -> Workload:
    changes: dict = {"description": f"{workload.description}; planted: {label}".lstrip("; ")}
    if plant is not None:
        changes["model_factory"] = _PlantedFactory(workload.model_factory, plant, label)
    if loss_fn is not None:
        changes["loss_fn"] = loss_fn
    return workload.with_options(**changes)


def _build(workload: Workload) -> nn.Module:
    """One model from the factory without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        return workload.model_factory()


def _check_modes(modes: Iterable[str]) -> tuple[str, ...]:
    from .modes import resolve_mode

    names = tuple(resolve_mode(m).name for m in modes)
    if not names:
        raise ConfigError("a plant needs at least one mode to act in")
    return names


def largest_layer(model_or_workload: nn.Module | Workload | str) -> str:
    """``named_modules()`` path of the Linear/Conv layer with the most parameters (first one on ties)."""
    model = model_or_workload
    if not isinstance(model, nn.Module):
        model = _build(get_workload(model_or_workload))
    best, best_size = None, -1
    for path, module in model.named_modules():
        if isinstance(module, COMPUTE_LAYERS):
            size = sum(p.numel() for p in module.parameters(recurse=False))
            if size > best_size:
                best, best_size = path, size
    if best is None:
        raise WorkloadError(f"{type(model).__name__} has no Linear or Conv layer to plant a regression in")
    return best


def _resolve_layer(workload: Workload, layer: str | None) -> str:
    model = _build(workload)
    path = largest_layer(model) if layer is None else layer
    try:
        model.get_submodule(path)
    except AttributeError:
        paths = [p for p, m in model.named_modules() if isinstance(m, COMPUTE_LAYERS)]
        raise WorkloadError(f"workload {workload.name!r} has no layer {path!r}; its Linear/Conv layers: {', '.join(paths)}") from None
    return path


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


# --- (a) a layer forced to fp32 --------------------------------------------------------------------


class ForcedFp32(nn.Module):
    """Runs ``layer`` with autocast switched off on float32 inputs, as a hand-written fp32 island does.

    The layer keeps its path as the parent; the coverage check names it ``<path>.layer``.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def force_fp32_layer(workload: Workload | str, layer: str | None = None) -> Workload:
    """Plant (a): ``layer`` (default: the largest Linear/Conv by parameters) always computes in float32.

    Its size is the layer's share of the step's matmul/convolution FLOPs, forward and backward
    (88% for the MNIST MLP's first layer, 28% for the CIFAR CNN's fc layer); the coverage check fails it
    whenever that share exceeds ``1 - min_low_precision_share``, naming ``<layer>.layer``.
    """
    workload = get_workload(workload)
    path = _resolve_layer(workload, layer)

    def plant(model: nn.Module) -> None:
        _replace(model, path, ForcedFp32(model.get_submodule(path)))

    return _planted(workload, f"layer {path} forced to fp32", plant=plant)


# --- (b) a slowdown of known size ------------------------------------------------------------------


def busy_wait(cpu_seconds: float) -> None:
    """Spin until the calling thread has used ``cpu_seconds`` of CPU time.

    CPU time, not wall time: on a shared machine the spin is then stretched by other processes
    exactly as the step's own computation is, so a plant sized against the step stays that size.
    """
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


@functools.cache
def gpu_cycles_per_second(device_index: int) -> float:
    """What one cycle of ``torch.cuda._sleep`` lasts on this GPU, timed with CUDA events (median of 5)."""
    cycles = 20_000_000
    rates = []
    with torch.cuda.device(device_index):
        torch.cuda._sleep(1_000_000)  # load the kernel
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            rates.append(cycles / (start.elapsed_time(end) / 1000.0))
    return sorted(rates)[len(rates) // 2]


def _delay(device: torch.device, seconds: float) -> None:
    """Delay one step by ``seconds`` wherever the step is bound.

    CUDA: a host spin *and* a ``torch.cuda._sleep`` kernel of that length on ``device`` (under its
    context, so cuda:N sleeps on N).  A launch-bound step (the GPU idles while the host launches
    kernels) hides a GPU sleep in its slack, and a GPU-bound one hides a host spin in the host's
    lead; with both, the step grows by the delay either way (up to twice it in between, which
    :func:`calibrate_delay` corrects against the measured drop).  CPU: a busy-wait.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            torch.cuda._sleep(max(1, int(seconds * gpu_cycles_per_second(index))))
        busy_wait(seconds)
    else:
        busy_wait(seconds)


class _DelayHook:
    """Forward pre-hook: in the named modes, delay each step by that mode's planted seconds (see :func:`_delay`)."""

    def __init__(self, delays: Mapping[str, float], device_type: str):
        self.delays, self.device_type = dict(delays), device_type

    def __call__(self, module: nn.Module, args):
        x = _first_tensor(args)
        delay = self.delays.get(running_mode(x, module), 0.0)
        if delay <= 0:
            return None
        device = x.device if x is not None else torch.device("cpu")
        if device.type != self.device_type:
            raise WorkloadError(
                f"slow_down was sized for {self.device_type} but the step runs on {device.type}; plant it with device={device.type!r}"
            )
        _delay(device, delay)
        return None


def calibrate_delay(achieved: Callable[[float], float], fraction: float, first: float, iterations: int = 2) -> float:
    """The delay whose measured slowdown is ``fraction``, by secant steps through (0, 0).

    ``achieved(delay)`` measures the relative slowdown a delay really causes (planted step time /
    clean step time - 1).  A delay can be hidden in part (launch-bound slack) or counted up to
    twice (host and device), so the first guess ``first`` is scaled by ``fraction / achieved``
    until the measured drop matches.  A delay that shows no effect at all is returned as is.
    """
    delay = first
    for _ in range(iterations):
        if delay <= 0 or fraction <= 0:
            break
        got = achieved(delay)
        if got <= 0:
            break
        delay *= fraction / got
    return delay


def slowdown_for_drop(drop: float) -> float:
    """The ``fraction`` for :func:`slow_down` that lowers a speedup by ``drop`` (0.1 = 10% lower).

    The speedup is fp32 time / mode time, so adding ``f`` x the mode's step time divides it by
    ``1 + f``: a drop ``d`` needs ``f = 1 / (1 - d) - 1``.
    """
    if not 0 <= drop < 1:
        raise ConfigError(f"a speedup drop must be in [0, 1), got {drop!r}")
    return 1.0 / (1.0 - drop) - 1.0


def slow_down(
    workload: Workload | str,
    fraction: float,
    *,
    modes: Sequence[str] = AMP_MODES,
    step_time_s: float | Mapping[str, float] | None = None,
    device: str | torch.device | None = None,
    calibration=None,
) -> Workload:
    """Plant (b): every step of ``modes`` takes ``fraction`` x that mode's step time longer.

    ``device`` (default: CUDA if there is one) is where the planted workload will run.

    * CUDA: a host spin and a ``torch.cuda._sleep`` kernel (see :func:`_delay`), so a launch-bound
      step is slowed as surely as a GPU-bound one.  Without ``step_time_s`` the delay is calibrated
      against the measured drop (:func:`calibrate_cuda_delay`, short measurements with
      ``calibration``); with it (one number, or one per mode, e.g. a baseline's
      ``ModeMeasurement.step_time_s``) the delay is ``fraction`` x that time, uncalibrated.
    * CPU: a busy-wait.  A spin also slows the step that follows it (cold caches and branch
      predictors; on a 1 ms MNIST step that nearly doubles the spin's cost), so without
      ``step_time_s`` the spin is calibrated on the CPU, in thread CPU time, until a step with it
      costs ``1 + fraction`` times a step without (:func:`calibrate_cpu_spin`).  With
      ``step_time_s`` the spin is simply ``fraction`` x that many CPU seconds.

    Use :func:`slowdown_for_drop` to size it against the speedup tolerance.
    """
    workload = get_workload(workload)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or fraction < 0:
        raise ConfigError(f"slow_down fraction must be a finite number >= 0, got {fraction!r}")
    modes = _check_modes(modes)
    device_type = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if step_time_s is None:
        if device_type == "cuda":
            delays = calibrate_cuda_delay(workload, fraction, modes, device or "cuda", calibration)
        else:
            delays = calibrate_cpu_spin(workload, fraction, modes)
    if step_time_s is not None:
        if isinstance(step_time_s, Mapping):
            missing = [m for m in modes if m not in step_time_s or step_time_s[m] is None]
            if missing:
                raise ConfigError(f"slow_down: no step time given for {', '.join(missing)}")
            delays = {m: fraction * float(step_time_s[m]) for m in modes}
        else:
            delays = {m: fraction * float(step_time_s) for m in modes}

    def plant(model: nn.Module) -> None:
        model.register_forward_pre_hook(_DelayHook(delays, device_type))

    shown = ", ".join(f"{m} +{d * 1e3:.3g} ms" for m, d in delays.items())
    return _planted(workload, f"slowdown of {fraction:.1%} of the step on {device_type} ({shown})", plant=plant)


def calibrate_cpu_spin(workload: Workload, fraction: float, modes: Sequence[str], pairs: int = 60) -> dict[str, float]:
    """Per mode, the CPU seconds of spin that make a CPU training step ``1 + fraction`` times as costly.

    Measured in thread CPU time, which other processes do not inflate, with steps alternating
    with and without the spin so that drift in the machine's speed cancels: the ratio of the
    medians gives the spin's real cost, and two secant steps from the first guess
    ``fraction`` x the step size the spin.  Modes the CPU cannot run get no spin.
    """
    from .mode_runner import prepare
    from .modes import unsupported_reason
    from .precision_policy import numerics_policy
    from .profiles import cpu_threads

    dataset = workload.dataset("cpu")
    model = _build(workload)
    spins = {}
    for mode in modes:
        if unsupported_reason(mode, "cpu"):
            continue
        runner = prepare(mode, model, workload.optimizer_factory, workload.loss_fn, "cpu")

        def relative_cost(spin: float, mode=mode, runner=runner) -> tuple[float, float]:
            """(median clean step, median step with the spin, spin included), steps alternating."""
            costs: tuple[list, list] = ([], [])
            with numerics_policy(mode), cpu_threads("cpu"):  # the thread count the gate measures with
                for i in range(2 * pairs + 4):
                    x, y = dataset.batch(runner.steps_taken, workload.batch_size)
                    begin = time.thread_time()
                    busy_wait(spin if i % 2 else 0.0)
                    runner.step(x, y)
                    if i >= 4:
                        costs[i % 2].append(time.thread_time() - begin)
            return statistics.median(costs[0]), statistics.median(costs[1])

        spin = fraction * relative_cost(0.0)[0]
        for _ in range(2):  # secant steps through (0, clean); a spin costs at least itself
            if spin <= 0:
                break
            clean, slowed = relative_cost(spin)
            spin = fraction * clean / max((slowed - clean) / spin, 1.0)
        spins[mode] = spin
    return spins


def calibrate_cuda_delay(workload: Workload, fraction: float, modes: Sequence[str], device, calibration=None) -> dict[str, float]:
    """Per mode, the delay that slows a CUDA step by ``fraction``, calibrated against the measured drop.

    The clean step times come from one short measurement; each guess is planted and measured the
    same way (:func:`calibrate_delay`), so the plant shows in the timing whether the step is
    launch-bound or GPU-bound.
    """
    clean = _measure_step_times(workload, modes, device, calibration)
    delays = {}
    for mode in modes:

        def achieved(delay: float, mode=mode) -> float:
            planted = _planted(
                workload, "calibration", plant=lambda model: model.register_forward_pre_hook(_DelayHook({mode: delay}, "cuda"))
            )
            return _measure_step_times(planted, [mode], device, calibration)[mode] / clean[mode] - 1.0

        delays[mode] = calibrate_delay(achieved, fraction, fraction * clean[mode])
    return delays


def _measure_step_times(workload: Workload, modes, device, calibration) -> dict[str, float]:
    """Median step time per mode from one short measurement (CUDA events on a GPU)."""
    from .measurement import MeasureConfig, measure

    config = calibration or MeasureConfig(warmup_steps=3, rounds=4, steps_per_block=10, memory_steps=0, precision_coverage=False)
    m = measure(workload, [x for x in modes if x != config.reference_mode] or list(modes), device=device, config=config)
    times = {name: mm.step_time_s for name, mm in m.modes.items()}
    times[m.reference.mode] = m.reference.step_time_s
    bad = [x for x in modes if not times.get(x)]
    if bad:
        raise WorkloadError(f"slow_down: could not time {', '.join(bad)} on {device} to size the delay")
    return times


# --- (c) a memory plant -----------------------------------------------------------------------------


class _RetainHook:
    """Forward pre-hook: in the named modes, keep ``extra_bytes`` alive until the next forward.

    The old tensor is dropped before the new one is allocated, so the step's peak rises by exactly
    ``extra_bytes`` (rounded up to the allocator's 512-byte blocks), not twice that.
    """

    def __init__(self, extra_bytes: int, modes: tuple[str, ...]):
        self.extra_bytes, self.modes = extra_bytes, modes
        self.kept: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args):
        x = _first_tensor(args)
        if running_mode(x, module) not in self.modes:
            return None
        self.kept = None
        device = x.device if x is not None else torch.device("cpu")
        self.kept = torch.empty(self.extra_bytes, dtype=torch.uint8, device=device)
        return None

    def __deepcopy__(self, memo):
        return _RetainHook(self.extra_bytes, self.modes)  # a fresh slot per model copy


def retain_activation(workload: Workload | str, extra_bytes: int, *, modes: Sequence[str] = AMP_MODES) -> Workload:
    """Plant (c): the named modes' peak memory rises by ``extra_bytes`` (an activation kept across the step).

    Size it against the memory tolerance with ``extra_bytes = k * memory_tolerance * fp32 peak``:
    the memory ratio then rises by ``k`` x the tolerance.  Peak memory is gated on CUDA only.
    """
    workload = get_workload(workload)
    if isinstance(extra_bytes, bool) or not isinstance(extra_bytes, int) or extra_bytes < 1:
        raise ConfigError(f"retain_activation extra_bytes must be a whole number >= 1, got {extra_bytes!r}")
    modes = _check_modes(modes)

    def plant(model: nn.Module) -> None:
        model.register_forward_pre_hook(_RetainHook(extra_bytes, modes))

    return _planted(workload, f"{extra_bytes / 2**20:.3g} MiB retained in {', '.join(modes)}", plant=plant)


# --- (d) a loss that overflows in fp16 only -----------------------------------------------------------


class Fp16OverflowLoss(nn.Module):
    """``base(out, y) + weight * v*v``, with ``v*v`` computed by a matmul (so autocast runs it in fp16).

    ``v*v`` is about 1e5: fine in float32 and bfloat16 (it adds ``weight * 1e5``, 0.1 by default,
    a constant that changes no gradient), inf in float16 (largest finite value 65504).  This is
    the shape of the classic fp16 bug: a sum of squares or a hard-coded large constant in the loss.
    """

    def __init__(self, base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], value: float = 316.3, weight: float = 1e-6):
        super().__init__()
        self.base, self.value, self.weight = base, value, weight

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = out.new_full((1, 1), self.value)
        square = torch.mm(v, v.t()).float().reshape(())
        return self.base(out, y) + self.weight * square


def overflow_in_fp16(workload: Workload | str, value: float = 316.3) -> Workload:
    """Plant (d): the loss is +inf in float16 (``amp_fp16``, ``fp16``) and finite in every other mode.

    ``value**2`` must exceed 65504 (the default squares to about 1e5).  Gradients stay finite, so
    the check that fails is ``finite_loss``, not the scaler's.
    """
    workload = get_workload(workload)
    if not value * value > FP16_MAX or not math.isfinite(value * value):
        raise ConfigError(f"overflow_in_fp16 value must square past {FP16_MAX:g} (and stay finite), got {value!r}")
    return _planted(workload, f"loss term {value:g}^2 overflows in fp16", loss_fn=Fp16OverflowLoss(workload.loss_fn, value))


# --- (e) a loss scale that collapses -------------------------------------------------------------------


class _Fp16HostileBackward(torch.autograd.Function):
    """Identity forward; backward rescales by a constant stored in the gradient's dtype and back.

    ``grad * c / c`` with ``c = 1e5`` is the identity in float32 and bfloat16.  Float16 cannot hold
    ``c`` (it becomes inf), so every fp16 gradient turns inf/NaN whatever the loss scale:
    GradScaler skips every step and halves its scale each time, while the loss stays finite.
    """

    CONSTANT = 1e5

    @staticmethod
    def forward(ctx, x):
        return x.clone()  # not a view: a later in-place op (ReLU(inplace=True)) must stay legal

    @staticmethod
    def backward(ctx, grad):
        c = torch.tensor(_Fp16HostileBackward.CONSTANT, dtype=grad.dtype, device=grad.device)
        return grad * c / c


def _hostile_backward_hook(_module, _args, output):
    return _Fp16HostileBackward.apply(output) if torch.is_tensor(output) else output


def collapse_loss_scale(workload: Workload | str, layer: str | None = None) -> Workload:
    """Plant (e): ``layer``'s output gradient (default: the largest layer's) is inf/NaN in float16.

    Under ``amp_fp16`` every step's gradients are non-finite, so GradScaler skips every step and
    its scale halves each time: after ``n`` steps it is ``65536 / 2**n``, below the default collapse
    limit of 1.0 after 17 steps.  The forward, and so the loss, is unchanged and finite.
    """
    workload = get_workload(workload)
    path = _resolve_layer(workload, layer)

    def plant(model: nn.Module) -> None:
        model.get_submodule(path).register_forward_hook(_hostile_backward_hook)

    return _planted(workload, f"fp16 gradients of layer {path} overflow", plant=plant)


@dataclass(frozen=True)
class PlantInfo:
    """What the quality benchmark and tests need to know about a plant: the checks it must fail."""

    name: str
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    consequences: tuple[str, ...] = ()
    """Checks that may fail too as a consequence, not a false alarm (a mode that never steps never learns)."""


PLANTS = {
    "force_fp32_layer": PlantInfo("force_fp32_layer", ("precision_coverage",), AMP_MODES),
    "slow_down": PlantInfo("slow_down", ("speedup",), AMP_MODES),
    "retain_activation": PlantInfo("retain_activation", ("memory",), AMP_MODES),
    "overflow_in_fp16": PlantInfo("overflow_in_fp16", ("finite_loss",), ("amp_fp16",)),
    "collapse_loss_scale": PlantInfo(
        "collapse_loss_scale", ("skipped_steps", "loss_scale"), ("amp_fp16",), consequences=("same_run", "same_run_loss")
    ),
}
"""Which checks each plant must fail, and in which modes (the others must not fail for it)."""
