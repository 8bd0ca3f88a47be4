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


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Studies run in tests set torch's default dtype (float64); later tests, and the fresh
    processes of the distributed test, must see torch's own default again."""
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def fresh_pyro():
    """An empty Pyro param store and a seeded Pyro RNG, and an empty store afterwards."""
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
