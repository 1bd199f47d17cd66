"""The pytest plugin (entry point ``ampgate``): options, the marker, the fixtures, one plugin object.

pytest loads this module in every run of every project that has pytest-ampgate installed, so it
imports nothing heavy: torch comes in only once a gated test runs.  The hooks that need the
session's state are methods of :class:`~pytest_ampgate.plugin.manager.AmpGatePlugin`, registered
here in ``pytest_configure``; only this subpackage imports pytest.
"""

from __future__ import annotations

import os

import pytest

from ..config import SETTINGS
from ..errors import AmpGateError, ConfigError
from .collection import MARKER
from .fixtures import PLUGIN_KEY, ampgate, ampgate_cifar, ampgate_mnist
from .options import BenchmarkJsonFolder, add_options, check_outputs, resolve

__all__ = ["ampgate", "ampgate_cifar", "ampgate_mnist"]


def pytest_addoption(parser, pluginmanager):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-benchmark says "disabled because xdist" in every process; the controller says it once
        import warnings

        warnings.filterwarnings("ignore", message="Benchmarks are automatically disabled because xdist")
    if pluginmanager.get_plugin("ampgate-benchmark-json") is None:
        pluginmanager.register(BenchmarkJsonFolder(parser), "ampgate-benchmark-json")
    add_options(parser)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**settings): an AMP regression gate, run with --ampgate. Settings override the ini defaults: {', '.join(SETTINGS)}.",
    )
    try:
        settings = resolve(config)
        if settings.gate.enabled:
            from ..file_safety import check_lock_dir

            check_lock_dir()  # a lock directory that is a file or not writable: say so now, not per test
    except (ConfigError, AmpGateError) as exc:
        raise pytest.UsageError(str(exc)) from None
    from ..session import GateSession
    from .manager import AmpGatePlugin

    options = settings.gate
    gate = GateSession(options, progress=_progress_writer(config))
    plugin = AmpGatePlugin(config, settings, gate)
    config.stash[PLUGIN_KEY] = plugin
    config.pluginmanager.register(plugin, "ampgate-session")
    workerinput = getattr(config, "workerinput", None)
    if options.enabled and workerinput is None and _dist_mode(config) == "load" and settings.raw_device.strip().lower() != "cuda:auto":
        # xdist: every gated test on one worker, so no worker queues plain tests behind the device lock
        # (see xdist_schedule); cuda:auto gives each worker its own GPU instead.
        import shutil
        import tempfile

        plugin.gated_ids_dir = tempfile.mkdtemp(prefix="ampgate-xdist-")
        config.add_cleanup(lambda: shutil.rmtree(plugin.gated_ids_dir, ignore_errors=True))
    if workerinput is not None:
        return
    # the process that sees every result writes the CI outputs
    try:
        check_outputs(settings)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if options.enabled:
        from .sigterm import stop_on_sigterm

        stop_on_sigterm(config)
    if settings.plot:
        from ..outputs.chart import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            raise pytest.UsageError(str(exc)) from None
    if options.enabled and config.pluginmanager.hasplugin("benchmark"):
        from ..outputs.benchmark import BenchmarkBridge

        config.pluginmanager.register(BenchmarkBridge(config, gate), "ampgate-benchmark")
    if options.enabled:
        from .reporting import html_report_requested

        if html_report_requested(config):
            from ..outputs.html import HtmlColumns

            config.pluginmanager.register(HtmlColumns(), "ampgate-html")


def _dist_mode(config) -> str:
    return getattr(config.option, "dist", "no") if config.pluginmanager.hasplugin("xdist") else "no"


def _progress_writer(config):
    """Progress lines at -v, written past output capturing; silent at the default verbosity."""
    if config.getoption("verbose") <= 0 or hasattr(config, "workerinput"):
        return None  # xdist workers have no terminal: the controller reports their gated tests instead

    def write(message: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[ampgate] {message}")
        else:
            reporter.write_line(f"[ampgate] {message}")

    return write
