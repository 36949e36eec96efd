"""Online DPO's one sampling round: n answers per prompt from the initial policy, scored by the reward model,
and each prompt's best vs worst valid answer as a preference pair.

    pairs, key = preference_pairs(stage, params, key, records, cfg.algorithm.dpo, path)

Each process samples its own prompts (every process runs the same number of sampler calls, a short last chunk
filled up with prompts that make no pairs) and keeps its pairs in `path` (RUN_DIR/dpo_pairs.process-<i>.jsonl),
so a resumed run trains on the same pairs.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np

from rlmt_jax.algorithms import DPOConfig, PairSelection, build_preference_pairs
from rlmt_jax.core.errors import UserError
from rlmt_jax.core.jsonl import read_jsonl, write_jsonl_atomic
from rlmt_jax.rollout.scored import Conversation
from rlmt_jax.rollout.stage import RolloutStage
from rlmt_jax.scale import multihost

log = logging.getLogger("rlmt_jax.trainer.loop")  # the trainer's log, where this round was reported from


def preference_pairs(stage: RolloutStage, params, key: jax.Array, records: list[Conversation], dpo: DPOConfig,
                     path: str) -> tuple[list[dict], jax.Array]:
    """This process's pairs {prompt_ids, chosen_ids, rejected_ids, chosen_score, rejected_score}: read from
    `path` when every process has its file, else sampled from `records` (this process's share, in chunks of
    its share of rollout.prompts_per_step) and written there -> (the pairs, the key left). Raises UserError on
    every process when some process has no pair."""
    if multihost.global_min_int(int(os.path.exists(path))):  # every process has its pairs: none samples
        return read_jsonl(path), key
    processes = jax.process_count()
    local = records[jax.process_index()::processes]
    chunk = max(stage.rollout.prompts_per_step // processes, 1)
    chunks = math.ceil(math.ceil(len(records) / processes) / chunk)  # process 0's count: the most
    pairs: list[dict] = []
    skipped = {"too_few_valid": 0, "too_long": 0, "tied": 0}
    for start in range(0, chunks * chunk, chunk):
        prompts = list(local[start:start + chunk])
        real = len(prompts)
        prompts += [records[0]] * (chunk - real)  # fillers: sampled for the lockstep, never scored
        chunk_pairs, selection, key = _pairs_of(stage, params, key, prompts, real, dpo)
        pairs += chunk_pairs
        skipped["too_few_valid"] += selection.skipped_too_few_valid
        skipped["too_long"] += selection.skipped_too_long
        skipped["tied"] += selection.skipped_tied
    log.warning("online DPO: %d pairs from %d prompts (skipped: %s)", len(pairs), len(local), skipped)
    if not multihost.global_min_int(len(pairs)):  # every process stops together
        raise UserError("online DPO: no preference pairs" + (" on some process" if processes > 1 else "")
                        + " (every prompt had fewer than algorithm.dpo.min_valid parseable answers, tied "
                        "scores, or too many tokens)")
    write_jsonl_atomic(path, pairs)
    return pairs, key


def _pairs_of(stage: RolloutStage, params, key: jax.Array, prompts: list[Conversation], real: int,
              dpo: DPOConfig) -> tuple[list[dict], PairSelection, jax.Array]:
    """The pairs of the first `real` prompts (the rest are fillers, sampled but not scored) -> (the pairs,
    the selection that made them, the key left)."""
    n = stage.rollout.n
    prompt_ids, _ = stage.text.encode(prompts)
    rollout, key = stage.sample(params, key, prompt_ids)
    texts = stage.text.decode_responses(rollout)[: real * n]
    repeated = [p for p in prompts[:real] for _ in range(n)]
    scored = stage.scorer.score_outputs(repeated, texts, stage.text.settings, stage.text.eos_texts)
    lengths = np.asarray(rollout.response_lengths)
    responses = [rollout.response_tokens(r) for r in range(len(texts))]
    selection = build_preference_pairs(
        scored.rewards.reshape(-1, n).tolist(), scored.valid.reshape(-1, n).tolist(),
        [[len(prompt_ids[p]) + int(lengths[p * n + i]) for i in range(n)] for p in range(real)],
        min_valid=dpo.min_valid, max_pair_tokens=dpo.max_pair_tokens,
    )
    pairs = [{"prompt_ids": prompt_ids[pair.prompt_index],
              "chosen_ids": responses[pair.prompt_index * n + pair.chosen_index],
              "rejected_ids": responses[pair.prompt_index * n + pair.rejected_index],
              "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score}
             for pair in selection.pairs]
    return pairs, selection, key
