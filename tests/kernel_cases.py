"""What the kernel test files share: where the kernels run, dtype names, fresh random keys."""

import itertools

import jax
import jax.numpy as jnp
import pytest

HAS_GPU = jax.default_backend() == "gpu"
# Compiled through Triton where a CUDA GPU is present, the Pallas interpreter elsewhere: one test either way.
INTERPRET = [pytest.param(not HAS_GPU, id="gpu" if HAS_GPU else "interpret")]
F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32
_seed = itertools.count()


def new_seed() -> int:
    """A seed never used before in this test session: every check draws fresh inputs."""
    return next(_seed)


def new_key() -> jax.Array:
    return jax.random.key(new_seed())
