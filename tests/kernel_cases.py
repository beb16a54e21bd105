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


class BoundsChecked:
    """Stands in for `jax.experimental.pallas.triton` inside a kernel module (monkeypatch its `plgpu`) in
    interpret mode: every plgpu.load / plgpu.store records whether a lane it does not mask off indexes
    outside the array. The interpreter clamps an out-of-range gather index and drops an out-of-range
    scatter, so a kernel that addresses memory it does not own can still return the right values there;
    on the GPU the same access reads or writes a neighbour's data. Gathered (array / scalar) indices are
    checked; `pl.ds` slices are not."""

    def __init__(self):
        from jax.experimental.pallas import triton as plgpu

        self._plgpu = plgpu
        self.violations: list[str] = []

    def __getattr__(self, name):
        return getattr(self._plgpu, name)

    def _check(self, ref, mask, what):
        if not getattr(ref, "transforms", None):  # a whole ref, no indices to check
            return
        indexer = ref.transforms[-1]
        oob = jnp.bool_(False)
        for axis, (i, dim) in enumerate(zip(indexer.indices, ref.ref.shape)):
            if hasattr(i, "size") and hasattr(i, "stride"):  # a pl.ds slice
                continue
            i = jnp.asarray(i)
            bad = (i < 0) | (i >= dim)
            if mask is not None and i.ndim:
                bad = bad & jnp.broadcast_to(mask, i.shape)
            oob = oob | jnp.any(bad)
        label = f"{what} of a {tuple(ref.ref.shape)} array"
        jax.debug.callback(lambda o: self.violations.append(label) if o else None, oob)

    def load(self, ref, *, mask=None, other=None, **kw):
        self._check(ref, mask, "load")
        return self._plgpu.load(ref, mask=mask, other=other, **kw)

    def store(self, ref, val, *, mask=None, **kw):
        self._check(ref, mask, "store")
        return self._plgpu.store(ref, val, mask=mask, **kw)
