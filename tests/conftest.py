import os

import pytest
import torch

# Two cores are shared by everything in CI; keep intra-op threads predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.pop("HF_TOKEN", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
