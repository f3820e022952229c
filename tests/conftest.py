import pytest
import torch

# One intra-op thread: test tensors are tiny, and tests that spawn worker processes
# (DDP, CLI subprocesses) would otherwise oversubscribe the cores many times over.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
