"""Find inactive channels and remove them: sparsity analysis and spec-level pruning."""

from selecsls.compress.pruning import prune, prune_to_budget
from selecsls.compress.sparsity import analyze_sparsity

__all__ = ["analyze_sparsity", "prune", "prune_to_budget"]
