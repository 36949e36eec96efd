"""rlmt-jax: RL with Model-rewarded Thinking (RLMT) in JAX/Flax NNX."""

__version__ = "0.1.0"
