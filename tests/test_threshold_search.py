"""pallas_kernels.threshold_search against numpy: the k-th largest value and the nucleus cut-off, exactly.

The kernel runs in the Pallas interpreter on CPU and compiled where a CUDA GPU is present (INTERPRET), beside
the jnp reference; rows span several of the kernel's blocks, a partial last one, -inf entries, ties, and rows
that are not searched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.threshold_search import largest_threshold
from pallas_kernels.threshold_search import triton as kernel
from tests.kernel_cases import INTERPRET, new_seed

IMPLS = [pytest.param(("triton", i), id=f"triton-{p.id}") for p in INTERPRET for i in p.values] + \
        [pytest.param(("xla", None), id="xla")]


def _rows(B: int, V: int) -> np.ndarray:
    rng = np.random.default_rng(new_seed())
    z = (rng.normal(size=(B, V)) * rng.uniform(0.5, 6, size=(B, 1))).astype(np.float32)
    z[0, rng.integers(0, V, V // 3)] = -np.inf  # banned tokens
    if B > 2:
        z[2] = np.round(z[2], 1)  # ties
    return z


def _search(impl, z, target, lo, hi, shift=None):
    name, interpret = impl
    f = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    return np.asarray(largest_threshold(f(z), f(target), f(lo), f(hi), f(shift), impl=name, interpret=interpret))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [7, 1000, 2 * kernel.BLOCK + 333])
def test_a_count_target_finds_the_kth_largest_value(impl, V):
    B = 5
    z = _rows(B, V)
    desc = -np.sort(-z, axis=-1)
    rng = np.random.default_rng(new_seed())
    k = rng.integers(1, V - V // 3 + 1, B)  # row 0 has at least V - V // 3 finite values
    k[1] = 1
    lo, hi = z.min(-1), z.max(-1)
    hi[4] = lo[4]  # row 4 is not searched
    got = _search(impl, z, k, lo, hi)
    want = desc[np.arange(B), k - 1]
    want[4] = lo[4]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [7, 1000, 2 * kernel.BLOCK + 333])
def test_a_mass_target_finds_the_nucleus_cutoff(impl, V):
    """The target falls halfway between two of the sorted cumulative masses (f64), at a step far above the f32
    sums' rounding, so the answer is one value, the least likely token of that nucleus."""
    B = 5
    z = _rows(B, V)
    z_max = z.max(-1)
    z[np.arange(B), np.argmin(np.where(np.isfinite(z), z, np.inf), -1)] = z_max - 1.05  # a step of exp(-1.05) in each row (tied with none)
    desc = -np.sort(-z, axis=-1)
    steps = np.exp(desc.astype(np.float64) - z_max[:, None])
    cum = np.cumsum(steps, axis=-1)
    rng = np.random.default_rng(new_seed())
    # j: below the value before it (not tied), weighing at least 1e-4 of the row
    ok = (desc[:, 1:] < desc[:, :-1]) & (steps[:, 1:] >= 1e-4 * cum[:, -1:])
    j = np.array([rng.choice(np.flatnonzero(ok[b])) + 1 for b in range(B)])
    target = (cum[np.arange(B), j - 1] + cum[np.arange(B), j]) / 2
    lo, hi = z.min(-1), z_max
    hi[3] = lo[3]
    got = _search(impl, z, target, lo, hi, shift=z_max)
    want = desc[np.arange(B), j]
    want[3] = lo[3]
    np.testing.assert_array_equal(got, want)


def test_the_sampler_filter_keeps_what_a_sort_keeps():
    """sampler._filtered (the searches) against a float64 numpy top-k / top-p / min-p by sorting, row by row,
    with every combination of the three cuts, at a vocabulary of several kernel blocks."""
    from polar_jax.engine.sampler import _filtered

    B, V = 12, kernel.BLOCK + 777
    rng = np.random.default_rng(new_seed())
    z = (rng.normal(size=(B, V)) * rng.uniform(0.5, 6, size=(B, 1))).astype(np.float32)
    top_k = np.array([0, 5, 0, 0, 300, 40, 0, 2000, 1, 0, V, 17], np.int32)
    top_p = np.array([1, 1, 0.5, 1, 0.9, 1, 0.95, 0.3, 0.7, 0.8, 1, 0.6], np.float32)
    min_p = np.array([0, 0, 0, 0.1, 0, 0.05, 0.2, 0, 0, 0.01, 0, 0.3], np.float32)
    got = np.isfinite(np.asarray(_filtered(jnp.asarray(z), jnp.asarray(top_k), jnp.asarray(top_p),
                                           jnp.asarray(min_p))))
    for b in range(B):
        desc = -np.sort(-z[b].astype(np.float64))
        k = top_k[b] if 0 < top_k[b] < V else V
        cut = desc[k - 1]
        p = np.exp(desc[:k] - desc[0])
        cum = np.cumsum(p / p.sum())
        if top_p[b] < 1:
            cut = max(cut, desc[np.searchsorted(cum, top_p[b])])  # the first position whose cumulative reaches it
        cut = max(cut, desc[0] + np.log(min_p[b])) if min_p[b] > 0 else cut
        np.testing.assert_array_equal(got[b], z[b] >= cut, err_msg=f"row {b}")
    assert got[0].all() and got[10].all() and got[1].sum() == 5 and got[8].sum() == 1
