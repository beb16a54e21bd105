"""What every Pallas-Triton backend checks before it runs."""

import jax


def check_backend(interpret):
    """Interpret mode anywhere; compiled only on a CUDA GPU (elsewhere the API falls back)."""
    if interpret is None:
        interpret = False
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError("the Triton backend needs a CUDA GPU (pass interpret=True to run it on CPU)")
    return interpret
