"""AdamW (optax) with global-norm clipping and a constant or cosine learning rate with linear warmup."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlmt_jax.core.errors import UserError

Schedule = Literal["constant", "cosine"]


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW settings (hashable: the update step takes it as a static argument). Defaults: GRPO's recipe.

    decay: 'all' decays every parameter (verl, used for GRPO/PPO); 'matrices' skips norm scales and
    biases (the Hugging Face Trainer behind TRL, used for DPO/SFT).
    total_steps is needed by the cosine schedule and by warmup.
    """

    lr: float = 1e-6
    schedule: Schedule = "constant"
    warmup_ratio: float = 0.0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    decay: Literal["all", "matrices"] = "all"

    def __post_init__(self):
        if self.lr <= 0:
            raise UserError(f"optimizer lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise UserError(f"optimizer schedule {self.schedule!r}: expected 'constant' or 'cosine'")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"optimizer warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        needs_total = self.schedule == "cosine" or self.warmup_ratio > 0
        if needs_total and (self.total_steps is None or self.total_steps < 1):
            raise UserError(
                f"optimizer total_steps must be set (>= 1) for schedule={self.schedule!r} "
                f"with warmup_ratio={self.warmup_ratio}, got {self.total_steps}"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"optimizer grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.decay not in ("all", "matrices"):
            raise UserError(f"optimizer decay {self.decay!r}: expected 'all' or 'matrices'")

    @property
    def warmup_steps(self) -> int:
        """ceil(warmup_ratio * total_steps), as the Hugging Face Trainer counts it."""
        return 0 if self.warmup_ratio == 0 else math.ceil(self.warmup_ratio * self.total_steps)


# The recipe's optimizers (../shared/RECIPE.md); cosine ones need total_steps filled in:
# dataclasses.replace(DPO_ADAMW, total_steps=n).
GRPO_ADAMW = AdamWConfig()
PPO_ACTOR_ADAMW = AdamWConfig()
PPO_CRITIC_ADAMW = AdamWConfig(lr=1e-5)
DPO_ADAMW = AdamWConfig(
    lr=3e-7, schedule="cosine", warmup_ratio=0.05, total_steps=1, weight_decay=1e-4, betas=(0.9, 0.95), decay="matrices"
)
SFT_ADAMW = AdamWConfig(
    lr=4e-6, schedule="cosine", warmup_ratio=0.1, total_steps=1, weight_decay=1e-4, betas=(0.9, 0.95), decay="matrices"
)


def learning_rate_schedule(cfg: AdamWConfig) -> optax.Schedule:
    """lr(step), step = number of updates already applied (the first update uses lr(0)).

    w = warmup_steps, n = total_steps:
      step < w:  lr * step / w                                    (linear warmup from 0)
      constant:  lr
      cosine:    lr * (m + (1 - m) * (1 + cos(pi * min(1, (step - w) / (n - w)))) / 2),  m = min_lr_ratio
    """
    w = cfg.warmup_steps
    decay_steps = max((cfg.total_steps or 1) - w, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        if cfg.schedule == "cosine":
            progress = jnp.clip((s - w) / decay_steps, 0.0, 1.0)
            factor = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            factor = jnp.ones_like(s)
        if w > 0:
            factor = jnp.where(s < w, s / w, factor)
        return cfg.lr * factor

    return schedule


def weight_decay_mask(params) -> object:
    """True for parameters that get weight decay under decay='matrices': not norm scales, not biases.

    Decided by the parameter's path (a key containing 'norm' or 'bias'); params: any pytree
    (an nnx.State) -> the same tree of bools.
    """

    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        return not any("norm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: AdamWConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(lr schedule, betas, eps, weight_decay) (decoupled decay:
    p <- p - lr * (adam_update + weight_decay * p)). The learning rate of each update is kept in the
    state; read it with `current_learning_rate`."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(cfg),
        b1=cfg.betas[0],
        b2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask if cfg.decay == "matrices" else None,
    )
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate the last update used (scalar), from a state made by `build_optimizer`."""
    states = opt_state if isinstance(opt_state, tuple) and not hasattr(opt_state, "hyperparams") else (opt_state,)
    for state in states:
        if hasattr(state, "hyperparams"):
            return state.hyperparams["learning_rate"]
    raise ValueError("the optimizer state holds no learning rate; was it made by build_optimizer?")
