"""The trainer: wires the rollout stage (prompts -> scored groups) to the update stage (scored groups ->
new weights), with checkpoints, metrics and stop signals.

    from rlmt_jax.settings.config import resolve
    from rlmt_jax.trainer import train
    summary = train(resolve("configs/grpo_llama31_8b_instruct.yaml", ["rollout.temperature=0.8"]))
"""

from rlmt_jax.trainer.loop import EXPORT_DIR, Trainer, TrainingError, export_policy, train

__all__ = ["EXPORT_DIR", "Trainer", "TrainingError", "export_policy", "train"]
