"""Merge methods beside DeVec: task arithmetic, TIES, DARE, magnitude pruning, and DeVec's merges (§4.1).

One file per method, each a few pure functions on tensors with its paper link:
  task_arithmetic.py   Ilharco et al. 2212.04089       exact on LoRA factors (concatenated)
  ties.py              Yadav et al. 2306.01708         trim, elect sign, disjoint mean (dense)
  dare.py              Yu et al. 2311.03099            drop & rescale, linear or TIES (dense)
  magnitude_prune.py   TIES' trim step alone           (dense)
  peft_factors.py      PEFT's factor-wise variant of the above (to reproduce PEFT adapters)
The registry (``registry.py``) maps plain names to methods; ``engine.merge`` runs one over a pool
(DeVec methods: over the unique parts of a pairwise decomposition, each pair's shared vector
added once with its own coefficient, paper arXiv 2512.22511 §4.1); ``writeout`` turns any merge
or mix into one LoRA (exact or SVD-compressed, error reported), a PEFT folder, a diffusers FLUX
LoRA, or merged full weights; ``config.MergeConfig`` is the YAML form.
"""

from .engine import iter_merge, merge, module_seed, pair_names
from .registry import ALIASES, CONVENTIONS, METHODS, MergeMethod, MethodName, get_method

__all__ = [
    "ALIASES", "CONVENTIONS", "METHODS", "MergeMethod", "MethodName", "get_method", "iter_merge", "merge",
    "module_seed", "pair_names",
]
