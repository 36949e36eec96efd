"""A group filter for tests/test_multihost.py (imported by its workers with --import): process 0 keeps every
group, every other process none, so the processes disagree on whether a step needs another sampling round."""

import jax
import jax.numpy as jnp

from rlmt_jax.algorithms import register_group_filter


@register_group_filter("process_zero_only")
def process_zero_only(rewards: jax.Array) -> jax.Array:
    """rewards: [groups, n] -> keep: [groups] bool, all True on process 0, all False elsewhere."""
    return jnp.full(rewards.shape[:1], jax.process_index() == 0)
