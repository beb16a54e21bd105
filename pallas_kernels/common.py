"""What the Pallas kernels and their APIs share: the backend check, the dot, host values of inputs."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_backend(interpret):
    """Interpret mode anywhere; compiled only on a CUDA GPU (elsewhere the API falls back)."""
    if interpret is None:
        interpret = False
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError("the Triton backend needs a CUDA GPU (pass interpret=True to run it on CPU)")
    return interpret


def dot(a, b, *, trans_b: bool):
    """a @ b (or a @ b.T) inside a kernel, fp32 accumulation; fp32 operands in IEEE f32, not TF32."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def concrete(v):
    """The numpy value of v if it is known at trace time (not traced, not None), else None."""
    if v is None or isinstance(v, jax.core.Tracer):
        return None
    try:
        return np.asarray(v)
    except Exception:  # noqa: BLE001  (anything that cannot be read on the host)
        return None
