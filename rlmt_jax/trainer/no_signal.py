"""A run that cannot learn says so: steps in which no group has any reward spread.

When the n rewards of every group of a step are equal (exactly), every group advantage (grpo, drgrpo, rloo,
reinforce_pp) is 0 and the policy gets no gradient from the rewards, only from the KL and entropy terms. In
think/strict mode a model that was never taught the think format writes no valid plan, every answer is scored
as `[NULL]` (or gets template.format_penalty), and that lasts for the whole run. A short spell is normal: the
tiny default's random policy has none in its first two steps, before a first plan closes by chance. So the
trainer warns once such steps have come WARN_AFTER_STEPS times in a row, then every WARN_EVERY_STEPS steps
while it lasts, naming the step's format-valid rate and, when that is 0, why and what to do.

The decision reads `groups_with_signal_fraction` (the rollout stage's metric, global over processes), so every
process warns alike, as the trainer's other warnings do.
"""

from __future__ import annotations

from collections.abc import Mapping

from rlmt_jax.rollout.stage import SIGNAL_METRIC
from rlmt_jax.settings.config import TemplateConfig

WARN_AFTER_STEPS = 5  # consecutive steps without reward spread before the first warning
WARN_EVERY_STEPS = 10  # then again every this many steps while it lasts

WARM_START = ("Start from the SFT warm-start (configs/sft_llama31_8b_warmstart.yaml, then "
              "grpo_llama31_8b_sft_warmstart.yaml) or from an Instruct model that writes the format")


class NoSignalWatch:
    """Follows the steps' metrics; `observe(step, metrics)` -> the warning to log now, or None.

    template: the run's template section (mode, strict, format_penalty: what a malformed output is scored);
    n: rollout.n. after / every: WARN_AFTER_STEPS / WARN_EVERY_STEPS when None (read when made)."""

    def __init__(self, template: TemplateConfig, n: int, after: int | None = None, every: int | None = None):
        self.template = template
        self.n = n
        self.after = WARN_AFTER_STEPS if after is None else after
        self.every = WARN_EVERY_STEPS if every is None else every
        self.since: int | None = None  # the first step of the current run of steps without spread

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        fraction = metrics.get(SIGNAL_METRIC)
        if fraction is None or fraction > 0:  # n = 1 (no groups), or a group has spread
            self.since = None
            return None
        if self.since is None:
            self.since = step
        length = step - self.since + 1
        if length < self.after or (length - self.after) % self.every:
            return None
        return self.message(step, float(metrics.get("format_valid_rate", 0.0)))

    def message(self, step: int, valid_rate: float) -> str:
        steps = f"step {step}" if step == self.since else f"steps {self.since}-{step}"
        text = (f"{steps}: no group had any reward spread (the {self.n} rewards of every prompt were equal), so "
                "every advantage is 0 and the policy learns nothing from the rewards (only the KL and entropy "
                f"terms move it); format-valid rate {valid_rate:.1%} at step {step}. ")
        text += self._why(valid_rate)
        return text + f" (warned again every {self.every} steps while it lasts)"

    def _why(self, valid_rate: float) -> str:
        template = self.template
        if valid_rate > 0 or template.mode == "none" or (template.format_penalty is None and not template.strict):
            return ("The reward model gives every answer to a prompt the same score: check model.reward_model and "
                    "reward.label, whether reward.max_length cuts the answers (reward_truncated), or sample more "
                    "varied answers (rollout.n, rollout.temperature).")
        if template.format_penalty is not None:
            scored = f"every output gets template.format_penalty={template.format_penalty}"
        else:
            scored = "template.strict=true scores every answer as `[NULL]`"
        fixes = [WARM_START]
        if template.mode == "think":
            fixes.append("use the zero template (template.mode=zero with template.zero_family)")
        unset = ["template.strict=false"] * template.strict + ["template.format_penalty=null"] * (
            template.format_penalty is not None)
        fixes.append(f"set {' and '.join(unset)} (the reward model then scores every output's text)")
        return (f"No output had the {template.mode} format (a well-formed plan) and {scored}: a model that was "
                f"never taught the format does not learn it from this reward. {'; or '.join(fixes)}.")
