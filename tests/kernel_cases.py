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


def normal(shape, dtype, scale=1.0):
    """Fresh standard normals (times scale) in dtype."""
    return (scale * jax.random.normal(new_key(), shape, jnp.float32)).astype(dtype)


def as_f32(a):
    return None if a is None else a.astype(jnp.float32)


def neuron_ids(F, C):
    """[C] int32: a fresh duplicate-free draw from range(F)."""
    return jax.random.permutation(new_key(), F)[:C].astype(jnp.int32)


def mlp_inputs(B, D, F, C, dtype, *, gated=False, bias=False, L=None, bias_scale=0.1):
    """Selective-MLP inputs: x [B, D], w_up / w_gate / w_down [(L,) F, D], biases, and idx [C] (neuron_ids)."""
    lead = () if L is None else (L,)
    return dict(
        x=normal((B, D), dtype),
        w_up=normal(lead + (F, D), dtype, D ** -0.5),
        w_gate=normal(lead + (F, D), dtype, D ** -0.5) if gated else None,
        w_down=normal(lead + (F, D), dtype, C ** -0.5),
        b_up=normal(lead + (F,), dtype, bias_scale) if bias else None,
        b_down=normal(lead + (D,), dtype, bias_scale) if bias else None,
        idx=neuron_ids(F, C),
    )


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
