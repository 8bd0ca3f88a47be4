"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tensors in these tests are tiny: one intra-op thread avoids thread-pool overhead
    (spinning threads make small triangular solves ~50x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
