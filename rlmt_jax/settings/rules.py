"""Validation of a whole run config: each section's own checks, the rules that read several sections, and the
algorithm's own (rlmt_jax.algorithms.specs), in a fixed order, so that a config with several problems always
reports the same first one.

    validate(cfg)   # cfg, or UserError "config key 'optimizer.micro_batch_size' (3) must divide the update ..."
"""

from __future__ import annotations

from rlmt_jax.algorithms.specs import check_variants, spec_of
from rlmt_jax.settings.sections import RunConfig, check_algorithm, require


def validate(cfg: RunConfig) -> RunConfig:
    """Raises one UserError naming the key for the first impossible value or combination; returns cfg.

    The sections check their own fields; the rules written out here read several sections (first the inputs a
    run cannot start without, then each rule next to the checks of the section whose key it names)."""
    model, data, rollout, algo, spec = cfg.model, cfg.data, cfg.rollout, cfg.algorithm, spec_of(cfg)
    require(model.policy is not None, "model.policy", "is required: the policy's Hugging Face directory")
    if spec.reward_model:
        require(model.reward_model is not None, "model.reward_model", f"is required by algorithm.name={algo.name}")
    require(data.train_path is not None, "data.train_path", "is required: a JSONL, Parquet or datasets dir")
    model.check()
    cfg.template.check()
    data.check()

    rollout.check()
    buckets = rollout.prompt_buckets
    require(not buckets or buckets[-1] <= data.max_prompt_tokens, "rollout.prompt_buckets",
            f"must not exceed data.max_prompt_tokens ({data.max_prompt_tokens})")

    spec.check(cfg, require)
    if rollout.devices:
        require(rollout.max_staleness == 1, "rollout.devices",
                f"(split placement) samples each step's rows during the update before it, one version old: it "
                f"needs rollout.max_staleness=1, got {rollout.max_staleness}")
        require(rollout.mesh.reshard, "rollout.devices",
                "(split placement) decodes from a copy of the weights on its own devices: it needs "
                "rollout.mesh.reshard=true")
        require(rollout.carried_cache == "recompute", "rollout.carried_cache",
                "keep has no rows to keep with split placement (rollout.devices): each step's rows finish "
                "before its update")
    if rollout.max_staleness:
        require(rollout.engine == "slots" or rollout.devices, "rollout.max_staleness",
                "needs rollout.engine=slots (the next steps' rows start in the slots this step's rows free) or "
                "split placement (rollout.devices)")
        require(spec.loop == "rollouts" and rollout.group_filter is None, "rollout.max_staleness",
                f"needs an algorithm that samples every step without rollout.group_filter (its extra rounds take "
                f"the next steps' prompts), not {algo.name} with group_filter={rollout.group_filter}")
        corr = algo.rollout_correction
        require((corr.weights != "off" or corr.mask != "off") and not corr.bypass, "rollout.max_staleness",
                "needs a rollout correction: tokens chosen by the previous policy are off-policy (set "
                "algorithm.rollout_correction.weights=token, or its mask)")
    require(rollout.carried_cache == "recompute" or rollout.max_staleness >= 1, "rollout.carried_cache",
            "keep applies to rows carried past an update: it needs rollout.max_staleness >= 1")
    check_variants(cfg, require)
    check_algorithm(algo)
    require(algo.overlong_buffer is None or 0 < algo.overlong_buffer <= rollout.max_new_tokens,
            "algorithm.overlong_buffer", f"must be in [1, rollout.max_new_tokens = {rollout.max_new_tokens}] "
            "or null (off)")

    cfg.optimizer.check()
    micro, batch = cfg.optimizer.micro_batch_size, spec.update_batch(cfg)
    require(batch.rows % micro == 0, "optimizer.micro_batch_size",
            f"({micro}) must divide the update batch, {batch.keys} = {batch.rows}")

    for section in (cfg.mesh, cfg.distributed, cfg.reward, cfg.checkpoint, cfg.logging, cfg.run):
        section.check()
    return cfg
