"""Logical-axis hooks: models name their axes; rlmt_jax/scale/mesh.py decides where they go.

Parameters carry `logical_axes` metadata (see `param`). Activations pass through `constrain(x, axes)`, which
does nothing unless a rules function is installed with `use_activation_sharding`, so the models stay free of
meshes and run unchanged on one CPU. Kernels that cannot be partitioned by XLA (Pallas, cuDNN) run through
`per_device(fn, in_axes, out_axes)`: a shard_map over the installed mesh, or `fn` itself without one.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax
from flax import nnx

ConstrainFn = Callable[[jax.Array, tuple], jax.Array]
# per_device_map(fn, in_axes, out_axes) -> fn over each device's blocks (see `per_device`)
PerDeviceFn = Callable[[Callable, tuple, tuple], Callable]
_activation_rules: contextvars.ContextVar[ConstrainFn | None] = contextvars.ContextVar(
    "rlmt_activation_rules", default=None
)
_per_device_map: contextvars.ContextVar[PerDeviceFn | None] = contextvars.ContextVar(
    "rlmt_per_device_map", default=None
)


def param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    """An nnx.Param whose metadata names one logical axis per dimension."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match the parameter's shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def logical_axes(variable: nnx.Variable) -> tuple[str, ...]:
    return variable.get_metadata()["logical_axes"]


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Applies the installed activation-sharding rule to `x` (no-op when none is installed)."""
    fn = _activation_rules.get()
    return x if fn is None else fn(x, axes)


def per_device(fn: Callable, in_axes: tuple, out_axes: tuple) -> Callable:
    """`fn` run on each device's blocks of its array arguments, whose dimensions are named by `in_axes` (one
    tuple of logical axes per argument; its one output's by `out_axes`), placed by the installed rules (a
    shard_map); `fn` itself when none are installed. `fn` must not call `constrain`."""
    wrap = _per_device_map.get()
    return fn if wrap is None else wrap(fn, in_axes, out_axes)


@contextlib.contextmanager
def use_activation_sharding(fn: ConstrainFn | None, per_device_map: PerDeviceFn | None = None) -> Iterator[None]:
    """Within this context (and the traces made in it) `constrain` calls `fn(x, axes)` and `per_device` calls
    `per_device_map(fn, in_axes, out_axes)`."""
    tokens = _activation_rules.set(fn), _per_device_map.set(per_device_map)
    try:
        yield
    finally:
        _activation_rules.reset(tokens[0])
        _per_device_map.reset(tokens[1])
