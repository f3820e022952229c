import os
import subprocess
from pathlib import Path

import pytest
import torch

# One intra-op thread: test tensors are tiny, and tests that spawn worker processes
# (DDP, CLI subprocesses) would otherwise oversubscribe the cores many times over.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


#: ``../shared/data/cifar10.sh`` relative to the repository root; ``SELECSLS_CIFAR10_SCRIPT`` names
#: another copy (e.g. from a git worktree). Not part of the project: absent on a user's machine.
CIFAR10_UNPACK_SCRIPT = Path(
    os.environ.get("SELECSLS_CIFAR10_SCRIPT", Path(__file__).resolve().parents[1].parent / "shared/data/cifar10.sh")
)


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory) -> Path:
    """CIFAR-10 unpacked into train/<class>/ and val/<class>/ (once per session); skips without the script."""
    if not CIFAR10_UNPACK_SCRIPT.is_file():
        pytest.skip(f"CIFAR-10 is not available here ({CIFAR10_UNPACK_SCRIPT} does not exist)")
    root = tmp_path_factory.mktemp("cifar10")
    done = subprocess.run(["bash", str(CIFAR10_UNPACK_SCRIPT), str(root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return root
