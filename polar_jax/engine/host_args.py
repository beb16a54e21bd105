"""A jitted program whose per-step host arguments reach the device in one copy.

Each numpy argument of a jitted call is a host-to-device copy of its own, and on an H100 each costs the host
about 0.07 ms however small it is (`python -m benchmarks.probe_dispatch_args`): an engine decode step sent 14
(tokens, slots, page table, lengths, sampling parameters, ...), about 1 ms of host time a step, more than
SmolLM2-135M's whole decode step on the device. `HostPacked` sends them as one int32 buffer instead and takes
them apart inside the program (static slices and bitcasts, no copies of note).
"""

from __future__ import annotations

import math

import jax
import numpy as np


def pack(host) -> tuple[np.ndarray, tuple]:
    """host (numpy arrays and scalars of 4-byte dtypes or bool, None, and tuples of them) as (buffer [N] int32,
    layout): the layout (hashable: the tree's structure and each leaf's shape and dtype) unpacks it."""
    leaves, treedef = jax.tree_util.tree_flatten(host)
    arrays = [np.asarray(x) for x in leaves]
    parts = []
    for a in arrays:
        if a.dtype == np.bool_:
            a = a.astype(np.int32)
        if a.dtype.itemsize != 4:
            raise TypeError(f"pack: host arguments must have 4-byte dtypes or bool, got {a.dtype} {a.shape}")
        parts.append(np.ascontiguousarray(a).reshape(-1).view(np.int32))
    buf = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return buf, (treedef, tuple((a.shape, a.dtype) for a in arrays))  # (dtype.name costs 6 µs a call)


def unpack(buf: jax.Array, layout: tuple):
    """The host arguments `pack` made buf and layout from, as device arrays of their own dtypes (traced)."""
    treedef, specs = layout
    leaves, at = [], 0
    for shape, dtype in specs:
        n = math.prod(shape)
        x = buf[at: at + n].reshape(shape)
        at += n
        if dtype == np.bool_:
            x = x != 0
        elif dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, dtype)
        leaves.append(x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class HostPacked:
    """jax.jit(program) for program(*statics, *device, *host), whose host arguments (everything after the
    n_static static and n_device device ones) travel in one buffer (`pack`). Called, lowered and counted
    (`_cache_size`) with the program's own arguments; donate: positions in the program's signature."""

    def __init__(self, program, n_static: int, n_device: int, donate: tuple[int, ...] = (), **jit_kw):
        self.program, self.n_static, self.n_device = program, n_static, n_device
        self._jit = jax.jit(self._unpacked, static_argnums=tuple(range(n_static + 1)),
                            donate_argnums=tuple(i + 1 for i in donate), **jit_kw)  # + 1: the layout

    def _unpacked(self, *args):
        n = self.n_static
        statics, layout, device, buf = args[:n], args[n], args[n + 1: -1], args[-1]
        return self.program(*statics, *device, *unpack(buf, layout))

    def _packed_args(self, args) -> tuple:
        split = self.n_static + self.n_device
        buf, layout = pack(args[split:])
        return (*args[: self.n_static], layout, *args[self.n_static: split], buf)

    def __call__(self, *args):
        return self._jit(*self._packed_args(args))

    def lower(self, *args):
        return self._jit.lower(*self._packed_args(args))

    def _cache_size(self) -> int:
        return self._jit._cache_size()
