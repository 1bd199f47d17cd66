"""pytest-ampgate: a regression gate for mixed-precision (AMP) training performance in PyTorch.

The engine (modes, workloads, data, measure, stats, gate, baselines) is a plain library that can
be called from a script; ``pytest_ampgate.plugin`` is the only subpackage that knows about pytest.

Names are imported lazily: pytest loads the plugin in every run of every project that has it
installed, and importing torch there would slow down runs that never ask for ``--ampgate``.
"""

import importlib

from .version import __version__ as __version__

_EXPORTS = {
    "AmpGateError": "errors",
    "BaselineError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ModeError": "errors",
    "WorkloadError": "errors",
    "DEFAULT_MODES": "config",
    "GateConfig": "config",
    "MeasureConfig": "config",
    "build_config": "config",
    "Comparison": "results",
    "Measurements": "results",
    "ModeMeasurement": "results",
    "measure": "measurement",
    "GateResult": "gate",
    "decide": "gate",
    "Check": "verdict",
    "Outcome": "verdict",
    "Verdict": "verdict",
    "DeviceDataset": "data",
    "from_tensors": "data",
    "MODES": "modes",
    "PrecisionMode": "modes",
    "resolve_mode": "modes",
    "unsupported_reason": "modes",
    "Workload": "workloads",
    "Metric": "workloads",
    "accuracy": "workloads",
    "mse": "workloads",
    "perplexity": "workloads",
    "token_accuracy": "workloads",
    "cifar_cnn": "workloads",
    "get_workload": "workloads",
    "mnist_mlp": "workloads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        # Not cached in globals(): a re-imported submodule (pytester's in-process runs drop modules
        # imported during a run) must not leave us handing out a stale class, which fails isinstance.
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
