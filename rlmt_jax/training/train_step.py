"""The one jitted update step (GRPO, PPO actor and critic, DPO, SFT), and the jitted forwards that
fill a batch's old/reference log-probs and old values.

  params, opt_state, metrics = train_step(graphdef, params, opt_state, batch,
                                          objective=spec_of(cfg).objective(cfg),
                                          optimizer=AdamWConfig(), num_micro_batches=8)

`graphdef, params = nnx.split(model, nnx.Param)`; `opt_state = init_optimizer_state(params, optimizer)`.
The batch is a dict of arrays with a leading row dimension (layout: rlmt_jax/algorithms/objectives.py). It is
cut into `num_micro_batches` micro-batches whose gradients are summed in a `lax.scan`, so only one
micro-batch's activations are alive at a time; remat of the decoder blocks comes from the model config.
Micro-batch k takes rows k, k + n, k + 2n, ...: with the rows sharded in contiguous blocks over the
data axes, every device keeps its own rows in every micro-batch (no resharding).
Compiled once per (shapes, graphdef, objective, optimizer, num_micro_batches); params and optimizer
state are donated. A non-finite loss or gradient leaves params and optimizer state unchanged and
reports metrics["finite"] = 0 so the caller can stop with a message.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlmt_jax.algorithms.objectives import critic_values, policy_logprobs_and_entropy
from rlmt_jax.training.optim import AdamWConfig, build_optimizer, current_learning_rate


def split_micro_batches(batch: dict, num_micro_batches: int) -> dict:
    """[B, ...] -> [n, B / n, ...], micro-batch k = rows k, k + n, k + 2n, ..."""

    def split(x):
        rows = x.shape[0]
        if rows % num_micro_batches:
            raise ValueError(f"batch of {rows} rows does not split into {num_micro_batches} micro-batches")
        return x.reshape(rows // num_micro_batches, num_micro_batches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def join_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of `split_micro_batches` for one array: [n, B / n, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def accumulate_gradients(graphdef, params, batch: dict, objective, num_micro_batches: int = 1):
    """Gradient of the objective over the whole batch, summed over micro-batches.

    Returns (loss, grads (float32, same tree as params), metrics). Because the objective normalises by
    whole-batch counts, the sum equals the gradient of the one-big-batch loss.
    """
    counts = objective.counts(batch)

    def loss_fn(p, micro_batch):
        return objective(nnx.merge(graphdef, p), micro_batch, counts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    to_f32 = functools.partial(jax.tree.map, lambda g: g.astype(jnp.float32))
    if num_micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, to_f32(grads), metrics

    micro_batches = split_micro_batches(batch, num_micro_batches)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    _, metric_shapes = jax.eval_shape(loss_fn, params, first)
    init = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes),
    )

    def add_micro_batch(carry, micro_batch):
        loss_sum, grad_sum, metric_sum = carry
        (loss, metrics), grads = grad_fn(params, micro_batch)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        metric_sum = jax.tree.map(jnp.add, metric_sum, metrics)
        return (loss_sum + loss, grad_sum, metric_sum), None

    (loss, grads, metrics), _ = jax.lax.scan(add_micro_batch, init, micro_batches)
    return loss, grads, metrics


def init_optimizer_state(params, optimizer: AdamWConfig):
    """The optax state of `build_optimizer(optimizer)` for `params`."""
    return build_optimizer(optimizer).init(params)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "objective", "optimizer", "num_micro_batches"),
    donate_argnames=("params", "opt_state"),
)
def train_step(graphdef, params, opt_state, batch: dict, *, objective, optimizer: AdamWConfig, num_micro_batches: int = 1):
    """One optimizer update on `batch`: accumulate gradients over micro-batches, clip, AdamW.

    graphdef: static NNX graphdef; params: nnx.State of Params (donated); opt_state: from
    `init_optimizer_state` (donated); objective: a hashable objective (rlmt_jax/algorithms/objectives.py);
    optimizer: AdamWConfig; num_micro_batches must divide the batch rows.
    Returns (params, opt_state, metrics): the objective's metrics (loss parts, KL, entropy, clip
    fractions, approx_kl, ...) plus grad_norm (before clipping), lr (of this update), finite (1/0: the loss,
    the gradient norm and every element of the update are finite).
    """
    loss, grads, metrics = accumulate_gradients(graphdef, params, batch, objective, num_micro_batches)
    grad_norm = optax.tree.norm(grads)
    tx = build_optimizer(optimizer)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    update_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & update_finite
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_params = keep(new_params, params)
    new_opt_state = keep(new_opt_state, opt_state)
    metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": current_learning_rate(new_opt_state),
        "finite": finite.astype(jnp.float32),
    }
    return new_params, new_opt_state, metrics


def _map_micro_batches(fn, batch: dict, num_micro_batches: int) -> jax.Array:
    if num_micro_batches == 1:
        return fn(batch)
    return join_micro_batches(jax.lax.map(fn, split_micro_batches(batch, num_micro_batches)))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "temperature", "num_micro_batches", "logits_chunk_size", "response_start")
)
def compute_logprobs(
    graphdef,
    params,
    batch: dict,
    *,
    temperature: float = 1.0,
    num_micro_batches: int = 1,
    logits_chunk_size: int | None = 1024,
    response_start: int = 0,
) -> jax.Array:
    """Aligned log-probs of batch["tokens"] under a CausalLM at `temperature` (the old / reference
    log-probs of an RL batch).  batch: tokens, attention_mask, [positions] [B, S] -> [B, S] float32.
    response_start > 0: only columns >= response_start are computed (0 before), as in PolicyObjective."""

    def forward(micro_batch):
        lp, _ = policy_logprobs_and_entropy(
            nnx.merge(graphdef, params), micro_batch, temperature, logits_chunk_size, response_start
        )
        return lp

    return _map_micro_batches(forward, batch, num_micro_batches)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_micro_batches"))
def compute_values(graphdef, params, batch: dict, *, num_micro_batches: int = 1) -> jax.Array:
    """Aligned values of a ValueModel (position t: V of tokens < t), the old values of a PPO batch.

    batch: tokens, attention_mask, [positions] [B, S] -> [B, S] float32
    """
    return _map_micro_batches(lambda mb: critic_values(nnx.merge(graphdef, params), mb), batch, num_micro_batches)
