"""The engine programs' host arguments travel in one buffer (polar_jax.engine.host_args): exact round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax.engine.host_args import HostPacked, pack, unpack


def _host_tree(rng):
    return (rng.integers(-2**31, 2**31 - 1, (5, 3), dtype=np.int64).astype(np.int32),
            np.array([0, 1, 2**31, 2**32 - 1], np.uint32),
            np.array([np.nan, -np.inf, np.inf, -0.0, 1e-45, 3.4e38, -7.25], np.float32),
            rng.random(6) < 0.5,
            None,
            (np.uint32(4_000_000_000), np.int32(-3), None, (np.float32(0.1),)),
            np.zeros((0, 4), np.int32))


def test_pack_then_unpack_gives_back_every_value_bit_for_bit():
    host = _host_tree(np.random.default_rng(0))
    buf, layout = pack(host)
    assert buf.dtype == np.int32 and buf.ndim == 1
    got = jax.jit(unpack, static_argnums=1)(jnp.asarray(buf), layout)
    want_leaves, want_tree = jax.tree_util.tree_flatten(host)
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    assert got_tree == want_tree  # None and the nesting come back where they were
    for w, g in zip(want_leaves, got_leaves):
        w, g = np.asarray(w), np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape
        if w.dtype == np.bool_:
            np.testing.assert_array_equal(g, w)
        else:  # bit patterns: NaN, -0.0 and subnormals included
            np.testing.assert_array_equal(g.view(np.uint32) if g.size else g, w.view(np.uint32) if w.size else w)
    # The layout is a static argument: equal arguments of equal shapes give equal layouts.
    assert hash(layout) == hash(pack(_host_tree(np.random.default_rng(1)))[1])


@pytest.mark.parametrize("bad", [np.zeros(3, np.float64), np.zeros(2, np.int64), np.zeros(2, np.int16), 7])
def test_pack_names_a_dtype_it_cannot_carry(bad):
    with pytest.raises(TypeError, match="4-byte dtypes or bool"):
        pack((np.zeros(2, np.int32), bad))


def test_host_packed_sends_one_buffer_and_donates_the_right_argument():
    def program(scale, dev, donated, ints, floats, flag):
        return donated + 1, dev * scale + ints.sum() + floats.sum() + flag.astype(jnp.float32).sum()

    f = HostPacked(program, 1, 2, donate=(2,))
    dev, donated = jnp.arange(3.0), jnp.ones(4)
    ints, floats, flag = np.array([1, 2], np.int32), np.array([0.5], np.float32), np.array([True, False, True])
    lowered = f.lower(2.0, dev, donated, ints, floats, flag)
    assert len(jax.tree_util.tree_leaves(lowered.args_info)) == 3  # dev, donated and one buffer
    new, out = f(2.0, dev, donated, ints, floats, flag)
    np.testing.assert_allclose(np.asarray(out), np.arange(3.0) * 2 + 3 + 0.5 + 2)
    np.testing.assert_array_equal(np.asarray(new), 2.0)
    assert donated.is_deleted() and not dev.is_deleted()
    assert f._cache_size() == 1
    f(2.0, dev, jnp.ones(4), ints + 1, floats, flag)  # new values, same shapes: no new program
    assert f._cache_size() == 1
