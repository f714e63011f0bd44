import os

import pytest
import torch

# Two cores are shared by everything in CI; keep intra-op threads predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.pop("HF_TOKEN", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny-model steps: on 2 shared cores, 2 OpenMP threads per process stall on a
    descheduled peer (measured 14.5 s vs 0.9 s for two GroCo steps under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
