import os
import subprocess
from pathlib import Path

import pytest
import torch

from training_fixtures import CIFAR10_ENV, unpacked_cifar10

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
    """CIFAR-10 as train/<class>/ and val/<class>/: the folder ``SELECSLS_CIFAR10`` names, else unpacked from the
    archive once per session; skips without either."""
    if os.environ.get(CIFAR10_ENV):
        try:
            return unpacked_cifar10(os.environ[CIFAR10_ENV])
        except ValueError as exc:  # a wrong path fails the tests that need it: a typo is not mistaken for a pass
            pytest.fail(str(exc))
    if not CIFAR10_UNPACK_SCRIPT.is_file():
        pytest.skip(
            f"CIFAR-10 is not available here ({CIFAR10_UNPACK_SCRIPT} does not exist; {CIFAR10_ENV}=DIR names an "
            "unpacked copy)"
        )
    root = tmp_path_factory.mktemp("cifar10")
    done = subprocess.run(["bash", str(CIFAR10_UNPACK_SCRIPT), str(root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return root
