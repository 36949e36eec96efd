"""Group filters by name (`rollout.group_filter`): which prompts' groups of n samples a step trains on.

DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, sec. 3.2; verl `algorithm.filter_groups`): a
group whose n rewards are all equal has GRPO advantages of 0 and gives no gradient; the trainer drops it and
samples more prompts until the step has rollout.prompts_per_step kept groups (at most
rollout.max_sampling_rounds rounds). `choose_groups` picks which groups that step trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlmt_jax.algorithms.registry import register_group_filter


@register_group_filter("varied")
def varied_groups(rewards: jax.Array) -> jax.Array:
    """DAPO's filter: keep a group unless its rewards are all equal (compared exactly: max > min, not
    std > 0, whose float rounding of the mean can leave a tiny std for equal rewards).

    rewards: [groups, n] -> keep: [groups] bool."""
    return jnp.max(rewards, axis=1) > jnp.min(rewards, axis=1)


def choose_groups(keeps: Sequence[np.ndarray], count: int) -> tuple[list[tuple[int, int]], int]:
    """The `count` groups a step trains on, from the keep masks of its sampling rounds ([groups] bool each):
    the kept groups in order (round by round, group by group), the first `count` of them; when fewer were
    kept, the dropped groups fill the rest, in the same order. -> ([(round, group)] in training order, how
    many of them are fills)."""
    kept = [(r, g) for r, keep in enumerate(keeps) for g in np.flatnonzero(keep)]
    dropped = [(r, g) for r, keep in enumerate(keeps) for g in np.flatnonzero(~np.asarray(keep, bool))]
    fills = max(count - len(kept), 0)
    if len(kept) + len(dropped) < count:
        raise ValueError(f"{len(kept) + len(dropped)} groups sampled, fewer than the {count} a step trains on")
    return [(int(r), int(g)) for r, g in kept[:count] + dropped[:fills]], fills
