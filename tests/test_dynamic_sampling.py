"""DAPO's dynamic sampling (rollout.group_filter): the filter, the choice of groups, and a trainer step that
samples more rounds from the data iterator until it has its groups, pinned by which prompts it trains on.

The rewards of the trainer runs are set by prompt: a "flat" prompt's samples all get 0 (its group is dropped),
every other prompt's sample i gets i (kept). Which prompts are flat is chosen from the data order itself.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlmt_jax.training.stage as update_stage
from rlmt_jax.algorithms import GROUP_FILTERS, choose_groups, varied_groups
from rlmt_jax.settings.config import resolve
from rlmt_jax.inputs.data import train_batches
from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.rewards import RewardScorer
from rlmt_jax.rollout.scored import ScoredRollouts
from rlmt_jax.trainer import Trainer

PROMPTS = [f"Fact {i}?" for i in range(16)]
N = 2
SMALL = [
    "rollout.prompts_per_step=4", f"rollout.n={N}", "rollout.max_new_tokens=8", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=64", "data.epochs=1", "checkpoint.save_every=1", "checkpoint.async_save=false",
    "logging.tensorboard=false", "run.export_at_end=false", "optimizer.micro_batch_size=8",
]


# ------------------------------------------------------------------------------------------- pure parts
def test_varied_keeps_a_group_unless_all_its_rewards_are_exactly_equal():
    one_ulp = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    rewards = jnp.asarray([
        [1.0, 1.0, 1.0, 1.0],       # all equal: dropped
        [3.0, 3.0, 1.0, 3.0],       # a tie and one other: kept
        [0.1, 0.1, 0.1, 0.1],       # equal floats whose float32 mean is not 0.1 exactly: dropped
        [1.0, one_ulp, 1.0, 1.0],   # one rounding step apart: kept
        [-3.0, -3.0, -3.0, -3.0],   # every output malformed (the format penalty): dropped
        [0.0, 0.0, 0.0, -0.0],      # -0.0 == 0.0: dropped
    ], jnp.float32)
    assert np.asarray(varied_groups(rewards)).tolist() == [False, True, False, True, False, False]
    assert GROUP_FILTERS("varied") is varied_groups


def test_choose_groups_takes_the_first_kept_groups_round_by_round_then_fills_with_dropped_ones():
    keeps = [np.array([True, False, True, False]), np.array([False, True, True, True])]
    assert choose_groups(keeps, 4) == ([(0, 0), (0, 2), (1, 1), (1, 2)], 0)
    short = [np.array([False, True, False, False]), np.array([False, False, True, False])]
    assert choose_groups(short, 4) == ([(0, 1), (1, 2), (0, 0), (0, 2)], 2)
    assert choose_groups([np.array([False, False])], 2) == ([(0, 0), (0, 1)], 2)


def test_rounds_of_different_prompt_buckets_are_left_padded_to_the_longest():
    def part(prompt_len, token):
        width = prompt_len + 2
        mask = np.zeros((2, width), np.int32)
        mask[:, prompt_len - 1:] = 1
        arrays = {"tokens": np.full((2, width), token, np.int32), "attention_mask": mask,
                  "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0), "response_mask": mask * 0 + (
                      np.arange(width) >= prompt_len), "sampler_logprobs": np.full((2, width), -1.0, np.float32),
                  "rewards": np.array([token, token + 0.5], np.float32)}
        stats = {"format_valid": np.ones(2, bool)}
        return ScoredRollouts(arrays, prompt_len, 2, [[{"content": str(token)}]] * 2, ["a", "b"], ["", ""], ["", ""],
                              stats)

    both = ScoredRollouts.concat([part(3, 7), part(5, 9)], prompt_len=5, pad_id=0)
    assert both.prompt_len == 5 and both.arrays["tokens"].shape == (4, 7)
    assert both.arrays["tokens"][0].tolist() == [0, 0, 7, 7, 7, 7, 7] and both.arrays["tokens"][2].tolist() == [9] * 7
    assert both.arrays["attention_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert both.arrays["positions"][0].tolist() == [0, 0, 0, 0, 0, 1, 2]  # the positions the sampler used
    assert both.arrays["response_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1]  # responses start at column 5
    assert both.arrays["sampler_logprobs"][0, :2].tolist() == [0, 0]
    assert both.arrays["rewards"].tolist() == [7, 7.5, 9, 9.5]
    picked = both.take_groups([1, 0])
    assert picked.arrays["rewards"].tolist() == [9, 9.5, 7, 7.5] and picked.prompts[0] == [{"content": "9"}]


@pytest.mark.parametrize("overrides, message", [
    (["rollout.group_filter=varied", "rollout.max_sampling_rounds=0"], "'rollout.max_sampling_rounds' must be >= 1"),
    (["rollout.group_filter=varied", "rollout.n=1"], "'rollout.group_filter' needs groups of rollout.n >= 2"),
    (["rollout.group_filter=varied", "algorithm.name=sft"], "'rollout.group_filter' needs an algorithm that samples"),
    (["rollout.group_filter=varied", "algorithm.name=dpo"], "'rollout.group_filter' needs an algorithm that samples"),
    (["rollout.group_filter=same"], "'rollout.group_filter': unknown group filter 'same'; registered: varied"),
])
def test_settings_a_user_can_get_wrong_name_their_key(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve(None, overrides)


def test_off_by_default():
    cfg = resolve(None, [])
    assert (cfg.rollout.group_filter, cfg.rollout.max_sampling_rounds) == (None, 10)


# ------------------------------------------------------------------------------------------- the trainer
def data_order(tmp_path):
    """The prompts of each batch the run draws, in order (prompts_per_step 4, shuffled by data.shuffle_seed)."""
    cfg = resolve(None, [*SMALL, f"data.train_path={prompts_file(tmp_path)}"])
    return [[item[-1]["content"] for item in batch.items]
            for batch in train_batches(cfg, [[{"role": "user", "content": p}] for p in PROMPTS])]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    return path


class Recorded:
    """Rewards set by prompt (flat prompts: 0 for every sample; others: the sample's index in its group) and
    every update's batch."""

    def __init__(self, monkeypatch, flat):
        self.batches, self.scored_prompts = [], []
        real_step, real_score = update_stage.train_step, RewardScorer.score_outputs

        def train_step(graphdef, params, opt_state, batch, **kwargs):
            self.batches.append({k: np.asarray(v) for k, v in batch.items()})
            return real_step(graphdef, params, opt_state, batch, **kwargs)

        def score_outputs(scorer, prompts, outputs, *args, **kwargs):
            scored = real_score(scorer, prompts, outputs, *args, **kwargs)
            texts = [p[-1]["content"] for p in prompts]
            self.scored_prompts.append(texts[::N])
            rewards = np.array([0.0 if t in flat else float(i % N) for i, t in enumerate(texts)], np.float32)
            return dataclasses.replace(scored, rewards=rewards)

        monkeypatch.setattr(update_stage, "train_step", train_step)
        monkeypatch.setattr(RewardScorer, "score_outputs", score_outputs)


def trained_prompts(trainer, batch):
    """The prompt text of each group of an update's batch, read back from its tokens."""
    start = int(np.flatnonzero(batch["response_mask"][0])[0])
    texts = []
    for row in range(0, batch["tokens"].shape[0], N):
        ids = batch["tokens"][row, :start][batch["attention_mask"][row, :start] > 0]
        decoded = trainer.text.tokenizer.decode(ids.tolist())
        texts.append(next(p for p in PROMPTS if p in decoded))
    return texts


def dynamic_run(tmp_path, flat, *overrides, run_dir=None):
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorded = Recorded(monkeypatch, flat)
        trainer = Trainer(resolve(None, [
            *SMALL, f"data.train_path={prompts_file(tmp_path)}", f"run.output_dir={run_dir or tmp_path / 'run'}",
            "rollout.group_filter=varied", "rollout.max_sampling_rounds=2", *overrides]))
        summary = trainer.run()
    return trainer, recorded, summary


@pytest.fixture(scope="module")
def order(tmp_path_factory):
    return data_order(tmp_path_factory.mktemp("order"))


def flat_prompts(order):
    """Step 1: batch 0 drops its groups 0 and 2, batch 1 its group 1 (batch 1 supplies the 2 missing groups).
    Step 2: batch 2 drops every group, batch 3 all but its group 3 (the step stays 3 groups short)."""
    b0, b1, b2, b3 = order
    return {b0[0], b0[2], b1[1], *b2, b3[0], b3[1], b3[2]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_cache, order):
    return dynamic_run(tmp_path_factory.mktemp("dynamic"), flat_prompts(order), "run.total_steps=3")


def test_a_step_samples_a_second_round_for_the_groups_the_first_dropped(straight, order):
    trainer, recorded, _ = straight
    b0, b1, b2, b3 = order
    assert recorded.scored_prompts == [b0, b1, b2, b3]  # each round is the next batch of the data iterator
    assert trained_prompts(trainer, recorded.batches[0]) == [b0[1], b0[3], b1[0], b1[2]]
    # the kept groups' rewards [0, 1] (mean 1/2, unbiased std 1/sqrt(2)) give GRPO advantages -+ 1/sqrt(2)
    np.testing.assert_allclose(recorded.batches[0]["advantages"], [-0.5 ** 0.5, 0.5 ** 0.5] * 4, rtol=1e-5)
    metrics = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "metrics.jsonl"))]
    assert {k: metrics[0][k] for k in ("sampling_rounds", "groups_kept_fraction", "groups_filled")} == {
        "sampling_rounds": 2, "groups_kept_fraction": 5 / 8, "groups_filled": 0}
    assert metrics[0]["reward_mean"] == 0.5 and metrics[0]["reward_std"] == 0.5  # of the trained groups only
    samples = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "samples.jsonl"))]
    assert [s["prompt"] for s in samples if s["step"] == 1] == [b0[1], b0[1]]  # of the trained groups


def test_a_step_still_short_after_the_last_round_fills_with_dropped_groups_and_says_so(straight, order):
    trainer, recorded, _ = straight
    b0, b1, b2, b3 = order
    assert trained_prompts(trainer, recorded.batches[1]) == [b3[3], b2[0], b2[1], b2[2]]
    np.testing.assert_allclose(recorded.batches[1]["advantages"], [-0.5 ** 0.5, 0.5 ** 0.5] + [0] * 6, rtol=1e-5,
                               atol=1e-6)
    metrics = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "metrics.jsonl"))]
    assert {k: metrics[1][k] for k in ("sampling_rounds", "groups_kept_fraction", "groups_filled")} == {
        "sampling_rounds": 2, "groups_kept_fraction": 1 / 8, "groups_filled": 3}


def test_the_data_iterator_state_counts_every_batch_and_the_run_ends_with_the_data(straight):
    trainer, recorded, summary = straight
    # run.total_steps=3, but two steps took the 4 batches of the one epoch: the run ends there, checkpointed
    assert summary["steps"] == 2 and len(recorded.batches) == 2
    assert trainer.batches.get_state()["next_step"] == 4
    saved = os.path.join(trainer.run_dir, "checkpoints", "1", "data_iter", "process_0-of-1.json")
    assert json.loads(open(saved).read())["next_step"] == 2  # step 1 took batches 0 and 1
    assert sorted(os.listdir(os.path.join(trainer.run_dir, "checkpoints"))) == ["1", "2"]


def test_a_resumed_run_with_dynamic_sampling_equals_the_uninterrupted_one(straight, tmp_path, order):
    trainer_a, recorded_a, _ = straight
    # the uninterrupted run's dir as it was after step 1 (its checkpoint of step 1, the data iterator's state in it)
    shutil.copytree(trainer_a.run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
    trainer_b, recorded_b, summary = dynamic_run(Path(trainer_a.run_dir).parent, flat_prompts(order),
                                                 "run.total_steps=3", run_dir=tmp_path / "run")
    assert summary["steps"] == 2 and recorded_b.scored_prompts == order[2:]  # step 2's rounds: batches 2 and 3
    for name, value in recorded_a.batches[1].items():
        np.testing.assert_array_equal(recorded_b.batches[0][name], value, err_msg=name)
    for a, b in zip(jax.tree.leaves(trainer_a.params), jax.tree.leaves(trainer_b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
