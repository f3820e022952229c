"""``python -m selecsls`` (also what ``torchrun -m selecsls train`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
