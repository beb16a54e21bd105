"""Per row, the largest threshold at or above which the tokens still hold a given count or mass: a sampler's
top-k and top-p cuts without a sort."""

from pallas_kernels.threshold_search.api import IMPLS, largest_threshold

__all__ = ["largest_threshold", "IMPLS"]
