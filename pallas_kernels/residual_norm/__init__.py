"""A projection's output added to the residual stream and the sum normalised, in one kernel."""

from pallas_kernels.residual_norm.api import IMPLS, Norm, add_and_norm

__all__ = ["add_and_norm", "Norm", "IMPLS"]
