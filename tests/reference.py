"""The dense forward the tests compare engines and evaluators against, one compiled program for every length."""

import functools

import jax
import jax.numpy as jnp

from polar_jax import forward, init_cache


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, seq):
    logits, _, _ = forward(cfg, params, seq, init_cache(cfg, 1, seq.shape[1], jnp.float32))
    return logits[0]


def dense_logits(cfg, params, tokens, width: int) -> jax.Array:
    """[len(tokens), V]: each position's next-token logits from one dense forward over tokens, padded on the
    right to `width` (causal: the padding changes no earlier position), so that every length runs one compiled
    program (an eager forward compiles each operation again for each new length)."""
    tokens = [int(t) for t in tokens]
    assert 0 < len(tokens) <= width, (len(tokens), width)
    return _logits(cfg, params, jnp.asarray([tokens + [0] * (width - len(tokens))], jnp.int32))[: len(tokens)]
