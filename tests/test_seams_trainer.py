"""The trainer's wiring, pinned with values on the tiny built-in models: which rows and groups each reward
and advantage belong to, that the settings of the run reach the losses and the optimizer, and that one
update moves each algorithm in the right direction for exactly the rows it trained on.

Every update the trainer runs is recorded (params before it, its batch, the objective's metrics and the
optimizer settings); the expected values are computed here from the recorded batch with a plain
full-logits forward and the formulas written out, not with the library's losses.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rlmt_jax.rollout.preference_pairs as pairs_lib
import rlmt_jax.training.stage as update_stage
from rlmt_jax.settings.config import resolve
from rlmt_jax.rollout.rewards import RewardScorer
from rlmt_jax.trainer.loop import Trainer

SMALL = [
    "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "rollout.prompt_buckets=[]",
    "data.max_prompt_tokens=64", "checkpoint.save_every=100", "checkpoint.async_save=false",
    "logging.tensorboard=false", "run.export_at_end=false", "optimizer.micro_batch_size=4",
]
PROMPTS = ["What is a good name for a small orange cat?", "Write a haiku about morning rain.",
           "Give me three tips for sleeping better.", "Why is the sea salty?", "Name a fruit that is red.",
           "How do bees make honey?", "What should I cook tonight?", "Describe a quiet library."]


@dataclasses.dataclass
class Update:
    graphdef: object
    params: object  # before the update
    batch: dict
    optimizer: object
    metrics: dict


@dataclasses.dataclass
class Scoring:
    prompts: list
    outputs: list
    rewards: np.ndarray
    valid: np.ndarray
    plans: list
    answers: list
    scored_rewards: np.ndarray  # before reward_of replaced them


class Recorder:
    """Records every train_step and every reward scoring of a run; `reward_of(text)` replaces the RM's rewards,
    `valid_of(text)` its format verdicts."""

    def __init__(self, monkeypatch, reward_of=None, valid_of=None):
        self.updates: list[Update] = []
        self.scorings: list[Scoring] = []
        real_step, real_score = update_stage.train_step, RewardScorer.score_outputs

        def train_step(graphdef, params, opt_state, batch, *, objective, optimizer, num_micro_batches=1):
            before = jax.tree.map(jnp.copy, params)  # params are donated
            out = real_step(graphdef, params, opt_state, batch, objective=objective, optimizer=optimizer,
                            num_micro_batches=num_micro_batches)
            self.updates.append(Update(graphdef, before, {k: np.asarray(v) for k, v in batch.items()}, optimizer,
                                       {k: float(v) for k, v in jax.device_get(out[2]).items()}))
            return out

        def score_outputs(scorer, prompts, outputs, *args, **kwargs):
            scored = real_score(scorer, prompts, outputs, *args, **kwargs)
            scored_rewards = scored.rewards.copy()
            if reward_of is not None:
                scored = dataclasses.replace(scored, rewards=np.array([reward_of(o) for o in outputs], np.float32))
            if valid_of is not None:
                scored = dataclasses.replace(scored, valid=np.array([valid_of(o) for o in outputs], bool))
            self.scorings.append(Scoring(list(prompts), list(outputs), scored.rewards.copy(), scored.valid.copy(),
                                         list(scored.plans), list(scored.answers), scored_rewards))
            return scored

        monkeypatch.setattr(update_stage, "train_step", train_step)
        monkeypatch.setattr(RewardScorer, "score_outputs", score_outputs)


def prompts_file(tmp_path, count=8):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n"
                            for p in PROMPTS[:count]))
    return path


def run(tmp_path, *overrides):
    trainer = Trainer(resolve(None, [*SMALL, f"run.output_dir={tmp_path / 'run'}", *overrides]))
    trainer.run()
    return trainer


def recorded_run(tmp_path, *overrides, valid_of=None):
    """(trainer, recorder) of a run whose rewards are text_reward and whose updates the recorder keeps."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = Recorder(monkeypatch, reward_of=text_reward, valid_of=valid_of)
        trainer = run(tmp_path, *overrides)
    return trainer, recorder


def forward(graphdef, params, batch, temperature=1.0):
    """Aligned log-probs and entropies [B, S] (0 at column 0) from the full logits: position t holds token t's."""
    model = nnx.merge(graphdef, params)
    logits = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]),
                   jnp.asarray(batch["positions"]) if "positions" in batch else None)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)[:, :-1]
    lp = jnp.take_along_axis(logp, jnp.asarray(batch["tokens"])[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return np.pad(np.asarray(lp), ((0, 0), (1, 0))), np.pad(np.asarray(entropy), ((0, 0), (1, 0)))


def text_reward(text: str) -> float:
    """A hand-made reward that depends on the whole text: a row scored for another row's text shows."""
    return (sum(map(ord, text)) % 101) / 10.0


def optimizer_settings(opt):
    return (opt.lr, opt.schedule, opt.warmup_ratio, opt.total_steps, opt.weight_decay, tuple(opt.betas), opt.eps,
            opt.grad_clip, opt.decay)


def actor_loss_by_hand(lp, old, ref, entropy, adv, mask, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
                       norm_length=None):
    """k2 KL; token-mean aggregation, or with norm_length L Dr. GRPO's seq-mean-token-sum-norm (a row's token
    sum / L, mean over rows): (loss, pg, kl, entropy)."""
    m = mask.astype(np.float64)
    m = m / m.sum() if norm_length is None else m / (norm_length * (m.sum(axis=1) > 0).sum())
    ratio = np.exp(lp - old)
    losses = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high))
    losses = np.where(adv < 0, np.minimum(losses, -adv * dual_clip), losses)
    pg = np.sum(m * losses)
    kl = np.sum(m * 0.5 * (ref - lp) ** 2)
    ent = np.sum(m * entropy)
    return pg + kl_coef * kl - entropy_coef * ent, pg, kl, ent


def response_start(mask):
    starts = {int(np.flatnonzero(row)[0]) for row in mask}
    assert len(starts) == 1  # every response starts at the bucket's prompt length
    return starts.pop()


# ----------------------------------------------------------------------------------------------- GRPO
GRPO = ["algorithm.name=grpo", "rollout.n=2", "rollout.temperature=0.7", "rollout.top_k=6", "rollout.top_p=0.5",
        "run.total_steps=2",
        "algorithm.update_epochs=2", "algorithm.aggregation=seq_mean_token_sum_norm", "algorithm.kl_estimator=k2",
        "algorithm.kl_coef=0.05", "algorithm.entropy_coef=0.01", "algorithm.clip_low=0.01", "algorithm.clip_high=0.05",
        "algorithm.dual_clip=3.0", "algorithm.grpo.eps=0.01", "optimizer.lr=1e-3", "optimizer.weight_decay=0.03",
        "optimizer.betas=[0.8,0.99]", "optimizer.eps=1e-7", "optimizer.grad_clip=0.5"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_cache):
    return recorded_run(tmp_path_factory.mktemp("grpo"), *GRPO)


def test_grpo_rewards_are_scored_for_their_own_rows_and_normalised_in_groups_of_rollout_n(grpo_run):
    trainer, rec = grpo_run
    assert len(rec.updates) == 4 and len(rec.scorings) == 2  # 2 steps x 2 epochs over one rollout each
    tokenizer = trainer.text.tokenizer
    for step, scoring in enumerate(rec.scorings):
        batch = rec.updates[2 * step].batch
        assert rec.updates[2 * step + 1].batch["advantages"].tolist() == batch["advantages"].tolist()
        start = response_start(batch["response_mask"])
        rows = batch["tokens"].shape[0]
        assert rows == len(scoring.outputs) == 8
        for i in range(rows):
            # the text scored for row i is row i's response; its prompt is prompt i // n of the step
            response = batch["tokens"][i, start:][batch["response_mask"][i, start:] > 0]
            assert tokenizer.decode(response.tolist(), skip_special_tokens=False) == scoring.outputs[i]
            prompt = batch["tokens"][i, :start][batch["attention_mask"][i, :start] > 0]
            assert scoring.prompts[i] == scoring.prompts[i - i % 2]
            assert scoring.prompts[i][-1]["content"] in tokenizer.decode(prompt.tolist())
        assert scoring.prompts[0] != scoring.prompts[2]
        assert batch["tokens"].shape[1] == start + 12  # rollout.max_new_tokens
        rewards = np.array([text_reward(t) for t in scoring.outputs]).reshape(4, 2)
        centred = rewards - rewards.mean(axis=1, keepdims=True)
        expected = centred / (rewards.std(axis=1, ddof=1, keepdims=True) + 0.01)  # grpo.eps = 0.01
        np.testing.assert_allclose(batch["advantages"], expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_grpo_samples_and_metrics_are_those_of_the_scored_rows(grpo_run):
    trainer, rec = grpo_run
    samples = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "samples.jsonl"))]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]  # logging.samples_per_step: the tiny default's 2
    for sample, (step, i) in zip(samples, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        scoring = rec.scorings[step]
        assert sample["output"] == scoring.outputs[i] and sample["reward"] == pytest.approx(scoring.rewards[i])
        assert sample["prompt"] == scoring.prompts[i][-1]["content"]
        assert (sample["plan"], sample["answer"]) == (scoring.plans[i], scoring.answers[i])
        assert sample["format_valid"] == bool(scoring.valid[i])
    # template.format_penalty (the tiny default's -3) is the reward of every malformed output
    invalid = [r for s in rec.scorings for r, v in zip(s.scored_rewards, s.valid) if not v]
    assert invalid and set(invalid) == {-3.0}
    metrics = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "metrics.jsonl"))]
    assert len(metrics) == 2
    for row in metrics:  # the sampler drew at the trainer's temperature (0.7): its log-probs are the trainer's
        assert row["logprob_diff_max"] < 1e-4


def test_grpo_without_a_group_filter_trains_each_step_on_the_next_batch_as_drawn(grpo_run):
    from rlmt_jax.inputs.data import train_batches

    trainer, rec = grpo_run
    assert trainer.cfg.rollout.group_filter is None  # the default: no dynamic sampling
    drawn = [[p[-1]["content"] for p in batch.items] for batch in train_batches(trainer.cfg, trainer.records)]
    assert [[p[-1]["content"] for p in s.prompts[::2]] for s in rec.scorings] == drawn[:2]  # every group trained
    assert trainer.batches.get_state()["next_step"] == 2  # one batch a step
    metrics = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "metrics.jsonl"))]
    assert not {"sampling_rounds", "groups_kept_fraction", "groups_filled"} & set(metrics[0])


def test_grpo_samples_only_tokens_inside_the_run_top_k_and_top_p(grpo_run):
    trainer, rec = grpo_run
    for update in rec.updates[::2]:  # the policy that sampled the step's rollout
        b = update.batch
        model = nnx.merge(update.graphdef, update.params)
        logits = model(jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]), jnp.asarray(b["positions"]))
        probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32) / 0.7, axis=-1))[:, :-1]
        chosen = np.take_along_axis(probs, b["tokens"][:, 1:, None], axis=-1)
        top6 = -np.sort(-probs, axis=-1)[..., :6]
        rank = (probs > chosen).sum(axis=-1)  # [B, S - 1]
        # the nucleus is taken from the top 6: the mass above a drawn token is below half of theirs
        above = np.where(top6 > chosen, top6, 0.0).sum(axis=-1) / top6.sum(axis=-1)
        counted = b["response_mask"][:, 1:] > 0
        assert rank[counted].max() < 6 and above[counted].max() < 0.5 + 1e-5
        assert rank[counted].max() >= 1  # not greedy


def test_grpo_log_probs_and_the_loss_use_the_run_settings(grpo_run):
    trainer, rec = grpo_run
    reference = rec.updates[0].params
    for k, update in enumerate(rec.updates):
        batch, epoch = update.batch, k % 2
        mask = batch["response_mask"]
        lp, entropy = forward(update.graphdef, update.params, batch, temperature=0.7)
        ref, _ = forward(update.graphdef, reference, batch, temperature=0.7)
        # old log-probs: the policy of the step's first epoch at the sampling temperature; ref: the start policy
        if epoch == 0:
            np.testing.assert_allclose(batch["old_logprobs"] * mask, lp * mask, atol=2e-5)
        np.testing.assert_allclose(batch["ref_logprobs"] * mask, ref * mask, atol=2e-5)
        adv = np.broadcast_to(batch["advantages"][:, None], mask.shape)
        loss, pg, kl, ent = actor_loss_by_hand(lp, batch["old_logprobs"], batch["ref_logprobs"], entropy, adv, mask,
                                               0.01, 0.05, 3.0, 0.05, 0.01, norm_length=12)  # max_new_tokens
        got = update.metrics
        np.testing.assert_allclose([got["pg_loss"], got["kl"], got["entropy"], got["loss"]], [pg, kl, ent, loss],
                                   rtol=1e-4, atol=1e-6)
    assert rec.updates[1].metrics["pg_clipfrac"] > 0 and rec.updates[3].metrics["kl"] > 0  # clip and KL at work


def test_grpo_optimizer_gets_the_run_settings_and_decays_every_parameter(grpo_run):
    trainer, rec = grpo_run
    for update in rec.updates:
        assert optimizer_settings(update.optimizer) == (1e-3, "constant", 0.0, 2, 0.03, (0.8, 0.99), 1e-7, 0.5, "all")


def sequence_logprobs(graphdef, params, batch, temperature):
    lp, _ = forward(graphdef, params, batch, temperature)
    return (lp * batch["response_mask"]).sum(axis=1)


def test_one_grpo_update_raises_the_higher_reward_sample_of_each_group(grpo_run):
    trainer, rec = grpo_run
    first, second = rec.updates[0], rec.updates[1]
    batch = first.batch
    change = (sequence_logprobs(first.graphdef, second.params, batch, 0.7)
              - sequence_logprobs(first.graphdef, first.params, batch, 0.7)).reshape(4, 2)
    rewards = np.array([text_reward(t) for t in rec.scorings[0].outputs]).reshape(4, 2)
    checked = 0
    for group in range(4):
        if rewards[group, 0] == rewards[group, 1]:
            continue
        better, worse = (0, 1) if rewards[group, 0] > rewards[group, 1] else (1, 0)
        assert change[group, better] > change[group, worse], (group, rewards, change)
        checked += 1
    assert checked >= 3


# ----------------------------------------------------------------------------------------------- PPO
PPO = ["algorithm.name=ppo", "rollout.n=1", "rollout.temperature=1.0", "run.total_steps=1", "algorithm.kl_coef=0.0",
       "algorithm.update_epochs=2", "algorithm.aggregation=token_mean", "algorithm.entropy_coef=0.0",
       "algorithm.ppo.gamma=0.9", "algorithm.ppo.gae_lambda=0.8", "algorithm.ppo.value_clip=0.05",
       "algorithm.ppo.value_coef=0.7", "algorithm.ppo.critic_lr=3e-3", "optimizer.lr=1e-3"]


def gae_by_hand(score, values, mask, gamma, lam):
    """One row: reward `score` on the last counted token; GAE over the counted tokens only."""
    counted = np.flatnonzero(mask)
    adv = np.zeros_like(values)
    next_value = next_adv = 0.0
    for j, t in enumerate(counted[::-1]):
        reward = score if j == 0 else 0.0
        delta = reward + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        adv[t], next_value = next_adv, values[t]
    return adv


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_cache):
    return recorded_run(tmp_path_factory.mktemp("ppo"), *PPO)


def test_ppo_scores_sit_on_the_last_response_token_and_gae_uses_the_run_settings(ppo_run):
    trainer, rec = ppo_run
    critic = [u for u in rec.updates if u.graphdef == trainer.critic_graphdef]
    actor = [u for u in rec.updates if u.graphdef == trainer.graphdef]
    assert len(critic) == len(actor) == 2
    batch = critic[0].batch
    mask = batch["response_mask"]
    # old values: the critic before its update, aligned like log-probs (V at t = value of the tokens before t)
    model = nnx.merge(critic[0].graphdef, critic[0].params)
    out = np.asarray(model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]),
                           jnp.asarray(batch["positions"])))
    values = np.pad(out[:, :-1], ((0, 0), (1, 0)))
    np.testing.assert_allclose(batch["old_values"] * mask, values * mask, atol=1e-5)
    scores = np.array([text_reward(t) for t in rec.scorings[0].outputs])
    raw = np.stack([gae_by_hand(s, v, m, 0.9, 0.8) for s, v, m in zip(scores, batch["old_values"], mask)])
    np.testing.assert_allclose(batch["returns"], (raw + batch["old_values"]) * mask, rtol=1e-5, atol=1e-5)
    counted = raw[mask > 0]
    whitened = (raw - counted.mean()) / np.sqrt(counted.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(batch["advantages"], whitened, rtol=1e-4, atol=1e-4)
    assert actor[0].batch["advantages"].tolist() == batch["advantages"].tolist()


def test_ppo_critic_and_actor_losses_and_optimizers_use_the_run_settings(ppo_run):
    trainer, rec = ppo_run
    critic = [u for u in rec.updates if u.graphdef == trainer.critic_graphdef]
    actor = [u for u in rec.updates if u.graphdef == trainer.graphdef]
    for update in critic:
        b = update.batch
        m = b["response_mask"]
        out = np.asarray(nnx.merge(update.graphdef, update.params)(
            jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]), jnp.asarray(b["positions"])))
        v = np.pad(out[:, :-1], ((0, 0), (1, 0)))
        clipped = b["old_values"] + np.clip(v - b["old_values"], -0.05, 0.05)
        err = np.maximum((v - b["returns"]) ** 2, (clipped - b["returns"]) ** 2)
        np.testing.assert_allclose(update.metrics["vf_loss"], 0.7 * np.sum(err * m) / m.sum(), rtol=1e-4)
        assert optimizer_settings(update.optimizer)[0] == 3e-3 and update.optimizer.decay == "all"
    assert critic[1].metrics["vf_clipfrac"] > 0
    for update in actor:
        b = update.batch
        lp, entropy = forward(update.graphdef, update.params, b, temperature=1.0)
        _, pg, _, _ = actor_loss_by_hand(lp, b["old_logprobs"], lp, entropy, b["advantages"], b["response_mask"],
                                         0.2, 0.2, 3.0, 0.0, 0.0)
        np.testing.assert_allclose(update.metrics["pg_loss"], pg, rtol=1e-4, atol=1e-6)
        assert "kl" not in update.metrics
        assert optimizer_settings(update.optimizer)[0] == 1e-3 and update.optimizer.decay == "all"


# ----------------------------------------------------------------------------------------------- DPO
MIN_VALID, MAX_PAIR_TOKENS = 3, 5000  # not the defaults (4, 8192)
DPO = ["algorithm.name=dpo", "template.mode=none", "template.strict=false", "template.format_penalty=null",
       "rollout.n=4", "rollout.temperature=1.0", f"algorithm.dpo.min_valid={MIN_VALID}",
       f"algorithm.dpo.max_pair_tokens={MAX_PAIR_TOKENS}", "algorithm.dpo.batch_size=4",
       "algorithm.dpo.epochs=2", "run.total_steps=2", "algorithm.dpo.beta=0.5",
       "algorithm.dpo.label_smoothing=0.1", "optimizer.lr=1e-3", "optimizer.schedule=cosine",
       "optimizer.warmup_ratio=0.0", "optimizer.weight_decay=0.02"]


def text_valid(text: str) -> bool:
    """A hand-made format verdict (template mode none parses every answer): about 4 answers in 5."""
    return sum(map(ord, text)) % 5 != 0


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_cache):
    tmp = tmp_path_factory.mktemp("dpo")
    selections = []  # the arguments the trainer gives build_preference_pairs
    real = pairs_lib.build_preference_pairs

    def build_preference_pairs(scores, valid, lengths, **settings):
        selections.append((scores, valid, lengths, settings))
        return real(scores, valid, lengths, **settings)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(pairs_lib, "build_preference_pairs", build_preference_pairs)
        # chunks of 4 and 2 prompts (+ 2 fillers)
        trainer, recorder = recorded_run(tmp, *DPO, f"data.train_path={prompts_file(tmp, 6)}", valid_of=text_valid)
    pairs = [json.loads(line) for line in open(os.path.join(trainer.run_dir, "dpo_pairs.process-0.jsonl"))]
    return trainer, recorder, pairs, selections


def test_dpo_pair_selection_gets_the_run_settings_and_each_samples_prompt_plus_response_length(dpo_run):
    trainer, rec, pairs, selections = dpo_run
    assert [settings for *_, settings in selections] == [
        {"min_valid": MIN_VALID, "max_pair_tokens": MAX_PAIR_TOKENS}] * 2
    # one entry per prompt of the chunk (4, then 2: the fillers are not scored), n = 4 samples each
    assert [len(scores) for scores, *_ in selections] == [4, 2]
    for (scores, valid, _, _), scoring in zip(selections, rec.scorings):
        np.testing.assert_array_equal(np.asarray(scores).ravel(), scoring.rewards)
        np.testing.assert_array_equal(np.asarray(valid).ravel(), scoring.valid)
    lengths = {(tuple(p["prompt_ids"]), len(p["chosen_ids"])) for p in pairs}
    lengths = [len(prompt) + response for prompt, response in lengths]  # the tokens the DPO step trains on
    passed = [n for _, _, rows, _ in selections for row in rows for n in row]
    assert set(lengths) <= set(passed)


def test_dpo_pairs_are_the_best_and_worst_scored_answers_of_each_prompt(dpo_run):
    trainer, rec, pairs, _ = dpo_run
    # every prompt of the data is sampled and scored n = 4 times, in order; the filler prompts are not scored
    scored = [p[-1]["content"] for s in rec.scorings for p in s.prompts]
    assert scored == [p for p in PROMPTS[:6] for _ in range(4)]
    decode = lambda ids: trainer.text.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    expected = []
    for scoring in rec.scorings:
        for g in range(len(scoring.outputs) // 4):
            rewards, valid = scoring.rewards[4 * g:4 * g + 4], scoring.valid[4 * g:4 * g + 4]
            kept = [i for i in range(4) if valid[i]]
            if len(kept) < MIN_VALID or max(rewards[kept]) == min(rewards[kept]):
                continue
            best = max(kept, key=lambda i: (rewards[i], -i))
            worst = min(kept, key=lambda i: (rewards[i], i))
            expected.append((scoring.outputs[4 * g + best], scoring.outputs[4 * g + worst],
                             float(rewards[best]), float(rewards[worst])))
    got = [(decode(p["chosen_ids"]), decode(p["rejected_ids"]), p["chosen_score"], p["rejected_score"])
           for p in pairs]
    assert len(got) >= 4 and got == expected
    # min_valid decided: a prompt with MIN_VALID valid answers made a pair, one with MIN_VALID - 1 did not
    valid_counts = [int(s.valid[4 * g:4 * g + 4].sum()) for s in rec.scorings for g in range(len(s.outputs) // 4)]
    assert {MIN_VALID - 1, MIN_VALID} <= set(valid_counts), valid_counts


def test_dpo_batches_hold_chosen_then_rejected_with_their_reference_log_probs(dpo_run):
    trainer, rec, pairs, _ = dpo_run
    assert len(rec.updates) == 2
    by_chosen = {tuple(p["prompt_ids"] + p["chosen_ids"]): p for p in pairs}
    reference = rec.updates[0].params
    for update in rec.updates:
        b = update.batch
        count, _, seq = b["tokens"].shape
        assert count == 4
        flat = {k: b[k].reshape(count * 2, seq) for k in ("tokens", "attention_mask", "response_mask")}
        for p in range(count):
            chosen = b["tokens"][p, 0][b["attention_mask"][p, 0] > 0].tolist()
            rejected = b["tokens"][p, 1][b["attention_mask"][p, 1] > 0].tolist()
            pair = by_chosen[tuple(chosen)]
            assert rejected == pair["prompt_ids"] + pair["rejected_ids"]
            assert b["response_mask"][p, 0].sum() == len(pair["chosen_ids"])
            assert b["response_mask"][p, 1].sum() == len(pair["rejected_ids"])
        ref_lp, _ = forward(update.graphdef, reference, flat)
        np.testing.assert_allclose(b["ref_logps"], (ref_lp * flat["response_mask"]).sum(axis=1).reshape(count, 2),
                                   atol=1e-4)
        # the loss with the run's beta and label smoothing
        lp, _ = forward(update.graphdef, update.params, flat)
        seq_lp = (lp * flat["response_mask"]).sum(axis=1).reshape(count, 2)
        h = (seq_lp[:, 0] - b["ref_logps"][:, 0]) - (seq_lp[:, 1] - b["ref_logps"][:, 1])
        log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
        loss = np.mean(-0.9 * log_sigmoid(0.5 * h) - 0.1 * log_sigmoid(-0.5 * h))
        np.testing.assert_allclose(update.metrics["dpo_loss"], loss, rtol=1e-4, atol=1e-6)
        assert optimizer_settings(update.optimizer) == (1e-3, "cosine", 0.0, 2, 0.02, (0.9, 0.999), 1e-8, 1.0,
                                                        "matrices")
    assert rec.updates[1].metrics["dpo_loss"] != pytest.approx(math.log(2.0))  # step 2: policy != reference


def test_one_dpo_update_raises_the_margin_of_exactly_its_pairs(dpo_run):
    trainer, rec, _, _ = dpo_run
    first, second = rec.updates
    b = first.batch
    count, _, seq = b["tokens"].shape
    flat = {k: b[k].reshape(count * 2, seq) for k in ("tokens", "attention_mask", "response_mask")}

    def margins(params):
        lp, _ = forward(first.graphdef, params, flat)
        s = (lp * flat["response_mask"]).sum(axis=1).reshape(count, 2)
        return s[:, 0] - s[:, 1]

    assert (margins(second.params) > margins(first.params)).all()


# ----------------------------------------------------------------------------------------------- SFT
def test_sft_learns_only_the_assistant_tokens_cut_at_max_seq_tokens_with_the_run_schedule(tmp_path, tiny_cache,
                                                                                           monkeypatch):
    from rlmt_jax.training.sequences import sft_tokens

    cap = 96  # algorithm.sft.max_seq_tokens: conversations (80 to 122 tokens) longer than it are cut on the right
    data = tmp_path / "sft.jsonl"
    answers = [f"<think>\nPlan {i}.\n</think>\n\nAnswer" + " and more" * (3 * i) for i in range(8)]
    conversations = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answers[i]}]
                     for i in range(8)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    rec = Recorder(monkeypatch)
    trainer = run(tmp_path, "algorithm.name=sft", f"data.train_path={data}", "data.epochs=1",
                  "algorithm.sft.batch_size=4", "algorithm.sft.epochs=1", "run.total_steps=null", "optimizer.lr=1e-3",
                  "optimizer.schedule=cosine", "optimizer.warmup_ratio=0.5", "optimizer.betas=[0.9,0.95]",
                  "template.format_penalty=null", f"algorithm.sft.max_seq_tokens={cap}")
    assert len(rec.updates) == 2
    tokenizer = trainer.text.tokenizer
    full = {}  # the first `cap` tokens of each conversation -> (its answer, all its tokens and assistant mask)
    for answer, conversation in zip(answers, conversations):
        ids, mask = sft_tokens(tokenizer, conversation)
        full[tuple(ids[:cap])] = (answer, ids, mask)
    assert len(full) == 8  # every conversation's first `cap` tokens are its own
    assert min(len(ids) for _, ids, _ in full.values()) < cap < max(len(ids) for _, ids, _ in full.values())
    for update in rec.updates:
        b = update.batch
        assert b["tokens"].shape[1] == cap
        for row, attention, loss_mask in zip(b["tokens"], b["attention_mask"], b["loss_mask"]):
            answer, ids, mask = full[tuple(row[attention > 0].tolist())]  # the conversation, cut at the cap
            np.testing.assert_array_equal(loss_mask[:len(ids)], [0, *mask[1:cap]])
            learned = tokenizer.decode(row[loss_mask > 0].tolist(), skip_special_tokens=False)
            whole = answer + "<|eot_id|>"
            assert learned == whole if len(ids) <= cap else (whole.startswith(learned) and learned != whole)
        lp, _ = forward(update.graphdef, update.params, b)
        m = b["loss_mask"]
        np.testing.assert_allclose(update.metrics["loss"], -np.sum(lp * m) / m.sum(), rtol=1e-5)
        assert optimizer_settings(update.optimizer) == (1e-3, "cosine", 0.5, 2, 0.01, (0.9, 0.95), 1e-8, 1.0,
                                                        "matrices")
    # warmup of one step from 0, then cosine: the logged learning rate of each update
    assert [u.metrics["lr"] for u in rec.updates] == [0.0, pytest.approx(1e-3)]
