import os

import pytest
import torch

from attnext import _ops

RUNNABLE_UNITS = _ops.cpu_units_runnable()
EXHAUSTIVE = os.environ.get("ATTNEXT_EXHAUSTIVE") == "1"


def pytest_runtest_setup(item):
    """cuda tests need a visible GPU (queried only when such a test is about to run, never at import);
    slow tests (the exhaustive grid) need ATTNEXT_EXHAUSTIVE=1."""
    if item.get_closest_marker("slow") and not EXHAUSTIVE:
        pytest.skip("exhaustive grid: set ATTNEXT_EXHAUSTIVE=1 to run")
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=RUNNABLE_UNITS)
def cpu_unit(request):
    """Runs the test on each CPU vector unit this machine can run, restoring the previous unit afterwards."""
    previous = _ops.set_cpu_unit(request.param)
    try:
        yield request.param
    finally:
        _ops.set_cpu_unit(previous)


@pytest.fixture
def restore_threads():
    """Restores torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    try:
        yield n
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def restore_deterministic():
    """Restores torch.use_deterministic_algorithms after a test that changes it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
