import sys
from pathlib import Path

#: The CIFAR-10 reference pipeline's modules import each other by name, as run.py runs them.
CIFAR10_REFERENCE = Path(__file__).resolve().parents[2] / "references" / "cifar10"
if str(CIFAR10_REFERENCE) not in sys.path:
    sys.path.insert(0, str(CIFAR10_REFERENCE))
