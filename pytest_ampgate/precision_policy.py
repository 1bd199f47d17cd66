"""The global float32 switches a precision mode pins: TF32 for matmul and cuDNN, cuDNN autotuning.

On Ampere and later, "FP32" matmuls and convolutions may silently run in TF32, so a speedup is only
AMP's if every mode computes its float32 regions the same way, and an "FP32" baseline is only
meaningful together with the policy it ran under.  This module is the one place that reads that
policy (:func:`current_tf32_policy`, recorded in the environment fingerprint), pins it for a mode
(:func:`numerics_policy`) and restores it, so measuring never changes what the rest of the process
computes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .modes import PrecisionMode, resolve_mode


@dataclass(frozen=True)
class TF32Policy:
    """The float32 matmul / convolution precision in force, exactly as torch reports it.

    ``matmul`` and ``cudnn_conv`` are the strings torch reports: ``"ieee"`` (true float32),
    ``"tf32"``, or with the torch >= 2.9 API ``"none"``, meaning nothing in the precision hierarchy
    was set and torch's default applies (IEEE for cuBLAS matmul). ``api`` names the API the values
    were read from: ``"fp32_precision"`` (torch >= 2.9) or ``"allow_tf32"`` (older torch, mapped to
    "tf32"/"ieee").
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


def _tf32_switches() -> list[tuple[object, str, object, object]]:
    """(holder, attribute, strict value, tf32 value) for every TF32 switch this torch has.

    The float32 matmul switch comes first and cuDNN's convolution switch second.  torch >= 2.9 has
    per-backend ``fp32_precision`` settings: matmul, cuDNN convolution and cuDNN RNN are all listed,
    so the pinned state is coherent (see :func:`numerics_policy`).  Older torch has only the legacy
    ``allow_tf32`` flags.
    """
    backends = torch.backends
    matmul = backends.cuda.matmul
    conv = getattr(backends.cudnn, "conv", None)
    if _read_fp32_precision(matmul) is not None and _read_fp32_precision(conv) is not None:
        switches = [(matmul, "fp32_precision", "ieee", "tf32"), (conv, "fp32_precision", "ieee", "tf32")]
        rnn = getattr(backends.cudnn, "rnn", None)
        if hasattr(rnn, "fp32_precision"):
            switches.append((rnn, "fp32_precision", "ieee", "tf32"))
        for name in ("matmul", "conv", "rnn"):  # oneDNN on the CPU: keep float32 strict there too
            holder = getattr(getattr(backends, "mkldnn", None), name, None)
            if hasattr(holder, "fp32_precision"):
                switches.append((holder, "fp32_precision", "ieee", "ieee"))
        return switches
    return [(matmul, "allow_tf32", False, True), (backends.cudnn, "allow_tf32", False, True)]


def _read_fp32_precision(obj: object) -> str | None:
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


def _legacy_flag(holder: object) -> str:
    """A legacy ``allow_tf32`` bool as the new API's words: "tf32", "ieee", or "unknown" where unreadable."""
    try:
        allowed = holder.allow_tf32
    except Exception:
        return "unknown"
    if allowed is True:
        return "tf32"
    if allowed is False:
        return "ieee"
    return "unknown"


def current_tf32_policy() -> TF32Policy:
    """Read the global TF32 policy without changing it, warning, or mixing APIs.

    torch >= 2.9 raises "mix of the legacy and new APIs" when ``allow_tf32`` or
    ``get_float32_matmul_precision()`` is read after the new ``fp32_precision`` API was used, and its
    legacy setters warn, so where the new API exists only it is read. Older torch only has the legacy
    ``allow_tf32`` booleans, which are mapped to ``"tf32"`` / ``"ieee"``. No CUDA call is made.
    """
    (matmul, attr, _s, _t), (conv, _a, _s2, _t2) = _tf32_switches()[:2]
    if attr == "fp32_precision":
        return TF32Policy(matmul=_read_fp32_precision(matmul), cudnn_conv=_read_fp32_precision(conv), api="fp32_precision")
    return TF32Policy(matmul=_legacy_flag(matmul), cudnn_conv=_legacy_flag(conv), api="allow_tf32")


def _legacy_cudnn_flag() -> bool | None:
    """torch's legacy ``cudnn.allow_tf32``, or None where it cannot be read (a state mixing both APIs)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except (RuntimeError, AttributeError):
        return None


def _matmul_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or None where a state mixing both APIs makes it raise."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _set_legacy_cudnn(value: bool) -> None:
    """The legacy cuDNN switch: the only way to move torch's own allow_tf32 bool with conv and RNN.

    Some torch releases (2.9-2.10) warn once that the legacy API will be deprecated; the user did
    not call it, so the warning is not theirs to see.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cudnn.allow_tf32 = value


@contextlib.contextmanager
def numerics_policy(mode: str | PrecisionMode) -> Iterator[None]:
    """Set the TF32 switches ``mode`` needs (strict IEEE unless the mode is ``tf32``), then restore them.

    Every mode pins the switches, not only ``fp32``: float32 regions left outside autocast must
    compute the same way in every mode, or a speedup would partly be TF32's.

    On torch >= 2.9 the new per-backend settings and the legacy readers
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``, read by
    inductor, TunableOp, the profiler and user code) must agree, or the legacy readers raise "mix
    of the legacy and new APIs".  So the float32 matmul precision is pinned with
    ``torch.set_float32_matmul_precision`` ("highest", or "high" for tf32), cuDNN through its legacy
    switch (which sets convolution and RNN together) and then each per-backend setting; on exit
    the user's float32 matmul precision comes back exactly ("medium" stays "medium"), then every
    per-backend setting.
    """
    mode = resolve_mode(mode)
    switches = _tf32_switches()
    new_api = switches[0][1] == "fp32_precision"
    saved_precision = _matmul_precision()
    saved_cudnn = _legacy_cudnn_flag() if new_api else None
    saved = [(holder, attr, getattr(holder, attr)) for holder, attr, _strict, _tf32 in switches]
    try:
        if new_api:
            torch.set_float32_matmul_precision("high" if mode.tf32 else "highest")
            _set_legacy_cudnn(mode.tf32)
        for holder, attr, strict, tf32 in switches:
            setattr(holder, attr, tf32 if mode.tf32 else strict)
        yield
    finally:
        if new_api:
            if saved_precision is not None:
                torch.set_float32_matmul_precision(saved_precision)
            if saved_cudnn is not None:
                _set_legacy_cudnn(saved_cudnn)
        for holder, attr, value in reversed(saved):
            setattr(holder, attr, value)
        if not new_api and saved_precision is not None and _matmul_precision() != saved_precision:
            torch.set_float32_matmul_precision(saved_precision)  # the legacy matmul flag moves it


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool = True) -> Iterator[None]:
    """Let cuDNN autotune convolutions during warm-up, restoring the user's setting afterwards."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def heuristic_conv_algorithms() -> Iterator[None]:
    """cuDNN picks convolution algorithms by its heuristics, not by timing, for the memory pass.

    With autotuning (``benchmark``) the algorithm, and so its workspace, is whichever ran fastest in
    this process, and two processes can pick differently: the same model's peak memory would move
    between runs.  ``deterministic`` is part of ATen's cuDNN cache key (``ConvolutionParams``), so
    with it on and autotuning off the warm-up's timed choices are not reused and the choice depends
    only on the shapes and the GPU.  The user's settings are restored afterwards.
    """
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved
