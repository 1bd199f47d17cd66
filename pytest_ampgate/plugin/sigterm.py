"""SIGTERM (a cancelled CI job, ``timeout``) stops the run as Ctrl-C does, keeping what finished.

The first SIGTERM raises KeyboardInterrupt, so pytest ends the session the usual way: the tests that
finished are reported and (under ``--ampgate-update``) recorded.  Two things make that hold under
pytest-xdist too, where the controller spends its time handling the workers' reports:

* a report is never half-handled: a SIGTERM that lands while a test report goes through the hooks
  (the controller's first gated report imports torch, which takes seconds) stops the run only
  once every hook has seen that report;
* a second SIGTERM (an impatient runner) changes nothing: the first is already stopping the run,
  and raising again would tear through pytest's own clean-up with a traceback.
"""

from __future__ import annotations

import signal
import threading

import pytest

MESSAGE = "SIGTERM received (a cancelled job?): stopping as after Ctrl-C"


class SigtermStop:
    """The SIGTERM handler, and the pytest plugin that holds it back while a report is handled."""

    def __init__(self):
        self.received = 0
        self.busy = 0
        self.pending = False

    def __call__(self, signum, frame):
        __tracebackhide__ = True  # pytest names the frame that was interrupted, not this one
        self.received += 1
        if self.received > 1:
            return  # the first one is already stopping the run
        if self.busy:
            self.pending = True
            return
        raise KeyboardInterrupt(MESSAGE)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logreport(self, report):
        """Every hook sees the report whole; a SIGTERM received meanwhile stops the run after it."""
        __tracebackhide__ = True
        self.busy += 1
        try:
            return (yield)
        finally:
            self.busy -= 1
            if self.pending and not self.busy:
                self.pending = False
                raise KeyboardInterrupt(MESSAGE)


def stop_on_sigterm(config) -> None:
    """Install the handler for this session (restored when it ends); a handler someone else
    installed is left alone."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return
    stop = SigtermStop()
    config.pluginmanager.register(stop, "ampgate-sigterm")
    signal.signal(signal.SIGTERM, stop)
    config.add_cleanup(lambda: signal.signal(signal.SIGTERM, previous))
