"""Shared test setup: one torch thread (tiny tensors gain nothing from more, and on a busy
2-core machine extra threads spin against each other and slow tiny runs by 10-100x)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
