"""Shared test setup.

Worker threads that spin while idle (libgomp's default) cost tens of ms per parallel region when
the cores are oversubscribed (CI runners, a shared dev box); the suite checks correctness, not
speed, so idle OpenMP threads sleep. Set before torch is imported; an explicit setting wins.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after); a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
