"""The fixtures a gated test asks for: the gate itself, or a built-in workload already judged."""

from __future__ import annotations

import pytest

from .collection import test_id
from .manager import item_state

PLUGIN_KEY = pytest.StashKey["object"]()
"""The session's AmpGatePlugin, on ``config.stash``."""


def _test_gate(request):
    plugin = request.config.stash[PLUGIN_KEY]
    session, node = plugin.gate, request.node
    state = item_state(node)
    if state.gate is None:
        reason = session.skip_reason()
        if reason:
            pytest.skip(reason)
        from ..session import TestGate

        config = state.config if state.config is not None else session.config_for(test_id(node))
        reason = session.distributed_skip_reason(config)
        if reason:  # like a missing GPU: a skip, or a failure under --ampgate-strict
            if config.strict:
                pytest.fail(f"--ampgate-strict: {reason}", pytrace=False)
            pytest.skip(reason)
        state.gate = TestGate(session, test_id(node), config)
    return state.gate


@pytest.fixture
def ampgate(request):
    """The gate for this test: ``ampgate.run(workload)`` trains it under each mode and judges it.

    ``workload`` is a built-in name ('mnist_mlp', 'cifar_cnn') or a ``pytest_ampgate.Workload``
    with your own model, data, loss and optimizer.  The verdict fails the test by itself.
    """
    return _test_gate(request)


@pytest.fixture
def ampgate_mnist(request):
    """The MNIST MLP trained under fp32 and each gated mode; the GateResult, already judged."""
    return _test_gate(request).run("mnist_mlp")


@pytest.fixture
def ampgate_cifar(request):
    """The CIFAR-10 CNN trained under fp32 and each gated mode; the GateResult, already judged."""
    return _test_gate(request).run("cifar_cnn")
