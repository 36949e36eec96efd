"""Cheap checksums of saved arrays, computed where the arrays are (on device) and again after a restore.

For an array x viewed as unsigned words w (its raw bytes: 1, 2 or 4 bytes per element as one word, 8-byte
elements as two 32-bit words) at linear positions i = 0..n-1 (C order):

    sum  = sum_i w_i               mod 2^32
    wsum = sum_i w_i * (2 i + 1)   mod 2^32

Any single changed word changes both (2i+1 is odd, so invertible mod 2^32); a swap of two words changes
`wsum`. The device version never reshapes (a flat view of a sharded array would gather it): positions come
from broadcasted iotas, so XLA reduces each shard where it lives and adds the partial sums.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
    """x's raw bytes as uint32 words: x.shape, or x.shape + (2,) for 8-byte dtypes."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """[*shape] uint32: each element's C-order linear index (mod 2^32)."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    return index


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> ([2] uint32 checksums, bool: every element finite (True for integer dtypes))."""
    words = _words(x)
    weights = _positions(words.shape) * jnp.uint32(2) + jnp.uint32(1)
    sums = jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return sums, finite


_summaries = jax.jit(lambda leaves: [_leaf_summary(x) for x in leaves])


def _host(x: jax.Array) -> np.ndarray:
    """A replicated result as numpy (also on several processes, where it is not fully addressable)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def device_checksums(leaves: dict[str, Any]) -> tuple[dict[str, list[int]], list[str]]:
    """{name: array} -> ({name: [sum, wsum]}, names of arrays with a non-finite element). One program;
    every process of a multi-host run must call it with the same global arrays."""
    names = list(leaves)
    arrays = [jnp.asarray(leaves[n]) if not isinstance(leaves[n], jax.Array) else leaves[n] for n in names]
    results = _summaries(arrays) if arrays else []
    sums = {n: [int(v) for v in _host(s)] for n, (s, _) in zip(names, results)}
    bad = [n for n, (_, finite) in zip(names, results) if not bool(_host(finite))]
    return sums, bad


def host_checksum(x: np.ndarray) -> list[int]:
    """The same [sum, wsum] of a numpy array (e.g. one restored into host memory)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
    weights = (np.arange(words.size, dtype=np.uint64) * 2 + 1).astype(np.uint32)  # wraps like uint32 math
    flat = words.reshape(-1)
    return [int(np.sum(flat, dtype=np.uint32)), int(np.sum(flat * weights, dtype=np.uint32))]
