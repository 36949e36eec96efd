"""Logical-axis hooks: models name their axes; rlmt_jax/mesh.py decides where they go.

Parameters carry `logical_axes` metadata (see `param`). Activations pass through `constrain(x, axes)`, which
does nothing unless a rules function is installed with `use_activation_sharding`, so the models stay free of
meshes and run unchanged on one CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax
from flax import nnx

ConstrainFn = Callable[[jax.Array, tuple], jax.Array]
_activation_rules: contextvars.ContextVar[ConstrainFn | None] = contextvars.ContextVar(
    "rlmt_activation_rules", default=None
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


@contextlib.contextmanager
def use_activation_sharding(fn: ConstrainFn | None) -> Iterator[None]:
    """Within this context (and the traces made in it) `constrain` calls `fn(x, axes)`."""
    token = _activation_rules.set(fn)
    try:
        yield
    finally:
        _activation_rules.reset(token)
