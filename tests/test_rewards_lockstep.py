"""Reward scoring in lockstep: every process runs the same reward batches (count and buckets agreed), each
giving its own rows. The plan is checked on hand-made row lengths, and a scorer that believes it is one of
two processes (a stand-in for the all-gather) runs the other process's extra batches with dummy rows and
still gives the scores of plain scoring."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ModelConfig, build_model
from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings, bucket_batches, lockstep_batches

BUCKETS = (4, 8, 16)


def test_bucket_batches_groups_rows_by_bucket_in_order_and_cuts_batches():
    #          row: 0  1  2  3   4  5  6
    lengths = [3, 9, 4, 16, 2, 5, 1]
    assert bucket_batches(lengths, BUCKETS, batch_size=2) == {
        4: [[0, 2], [4, 6]],  # lengths 3, 4, 2, 1
        8: [[5]],
        16: [[1, 3]],
    }


def test_lockstep_runs_the_most_batches_any_process_has_per_bucket_with_empty_rows_for_the_rest():
    local = bucket_batches([3, 9, 4], BUCKETS, batch_size=2)  # {4: [[0, 2]], 16: [[1]]}
    counts = np.array([[1, 0, 1],   # this process: one batch of 4, one of 16
                       [3, 1, 0]])  # the other: three of 4, one of 8
    assert lockstep_batches(local, BUCKETS, counts) == [
        (4, [0, 2]), (4, []), (4, []),  # buckets ascending, as many batches as the busiest process
        (8, []),
        (16, [1]),
    ]


def test_lockstep_with_one_process_is_the_plain_plan():
    local = bucket_batches([3, 9, 4, 2, 1], BUCKETS, batch_size=2)
    counts = np.array([[len(local.get(b, [])) for b in BUCKETS]])
    plain = [(bucket, chunk) for bucket, chunks in sorted(local.items()) for chunk in chunks]
    assert lockstep_batches(local, BUCKETS, counts) == plain == [(4, [0, 2]), (4, [3, 4]), (16, [1])]


class FakeTwoProcesses:
    """HostRows as seen by process 0 of 2, the other process holding `other_counts` batches per bucket."""

    process_count = 2
    rows_multiple = 1

    def __init__(self, other_counts):
        self.other_counts = np.asarray(other_counts)
        self.put_shapes = []

    def gather(self, values):
        return np.stack([values, self.other_counts])

    def put(self, arrays):
        self.put_shapes.append(tuple(a.shape for a in arrays))
        return tuple(jnp.asarray(a) for a in arrays)

    def take(self, array):
        return np.asarray(array)


@pytest.fixture(scope="module")
def reward_model():
    config = ModelConfig(architecture="LlamaForSequenceClassification", vocab_size=64, hidden_size=16,
                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         pad_token_id=0)
    return build_model(config, nnx.Rngs(0))


def scorer(model, hosts=None):
    tokenizer = types.SimpleNamespace(chat_template="{{ messages }}", pad_token_id=0, eos_token_id=None)
    return RewardScorer(model, tokenizer, RewardSettings(max_length=16, batch_size=4, buckets=BUCKETS), hosts=hosts)


def test_lockstep_scorer_runs_the_agreed_batches_and_scores_like_plain_scoring(reward_model):
    rows = [[5, 6, 7], [9] * 9, [3, 4, 5, 6], [1, 2], [7] * 16]  # buckets 4, 16, 4, 4, 16
    plain = scorer(reward_model).score_ids(rows)
    hosts = FakeTwoProcesses(other_counts=[1, 2, 0])  # the other process: one batch of 4, two of 8
    lockstep = scorer(reward_model, hosts).score_ids(rows)
    np.testing.assert_allclose(lockstep, plain, atol=1e-6, rtol=0)
    assert len(set(np.round(plain, 5))) == 5  # five different rows, five different scores
    # this process's share of a 4-row batch is 2 rows: buckets 4, 4 (three rows of 4), 8, 8 (dummies), 16
    assert hosts.put_shapes == [((2, 4), (2, 4))] * 2 + [((2, 8), (2, 8))] * 2 + [((2, 16), (2, 16))]


def test_lockstep_scorer_with_no_rows_still_runs_the_other_process_batches(reward_model):
    hosts = FakeTwoProcesses(other_counts=[0, 1, 0])
    assert scorer(reward_model, hosts).score_ids([]).shape == (0,)
    assert hosts.put_shapes == [((2, 8), (2, 8))]


def test_lockstep_batch_size_must_split_between_the_processes(reward_model):
    hosts = FakeTwoProcesses(other_counts=[0, 0, 0])
    hosts.rows_multiple = 4  # batch split 8 over 2 processes: batch_size 4 cannot hold 4 rows a process
    with pytest.raises(UserError, match="reward batch_size 4: must be a multiple of 8"):
        scorer(reward_model, hosts)
