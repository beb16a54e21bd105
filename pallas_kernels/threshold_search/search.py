"""The search's steps, shared by the kernel (per row: scalars, [W] masses) and the reference ([B], [B, W]).

Floats are searched as uint32 keys that order as the values do: WAYS thresholds a pass, evenly spaced above
the row's lo key (those past its hi key clipped to it), cut the range to a sub-range of at most 1/WAYS of it;
PASSES passes (WAYS ** PASSES = 2 ** 32) leave a single key, so the answer is exact. WAYS is a power of two,
as the kernel's vectors must be."""

from __future__ import annotations

import jax
import jax.numpy as jnp

WAYS = 16
PASSES = 8


def key(z: jax.Array) -> jax.Array:
    """uint32 keys that order as the float32 values z do (NaN aside)."""
    b = jax.lax.bitcast_convert_type(z, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def value(k: jax.Array) -> jax.Array:
    """key's inverse."""
    return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


def thresholds(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """[..., WAYS] uint32 keys above lo [...], the last ones clipped to hi (all lo where lo = hi)."""
    step = (hi - lo) // WAYS + 1  # lo + step * WAYS <= hi + WAYS: no uint32 overflow (hi <= +inf's key)
    ways = jnp.arange(1, WAYS + 1, dtype=jnp.uint32)
    return jnp.where((lo < hi)[..., None], jnp.minimum(lo[..., None] + step[..., None] * ways, hi[..., None]),
                     lo[..., None])


def narrowed(lo: jax.Array, hi: jax.Array, mass: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) cut to the sub-range where mass [..., WAYS] (at `thresholds(lo, hi)`) falls below target."""
    t = thresholds(lo, hi)
    ok = mass >= target[..., None]
    return (jnp.max(jnp.where(ok, t, lo[..., None]), axis=-1),
            jnp.min(jnp.where(ok, hi[..., None], t - 1), axis=-1))
