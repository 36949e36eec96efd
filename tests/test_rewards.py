"""Reward scoring: the RM's own template and tokenizer, bucketed jitted batches, parity with transformers."""

import numpy as np
import pytest
from fixtures_reward_models import llama_rm_dir, qwen_rm_dir, torch_scores  # noqa: F401  (fixtures)
from fixtures_tokenizers import qwen_tokenizer, qwen_tokenizer_dir  # noqa: F401

from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings, bucket_for, right_pad, truncate
from rlmt_jax.inputs.templates import TemplateSettings, eos_texts_of

SETTINGS = RewardSettings(max_length=256, batch_size=4, min_bucket=32)

PROMPTS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Explain why the sky is blue in two sentences."}],
    [
        {"role": "user", "content": "Give me three tips for writing clear emails."},
        {"role": "assistant", "content": "Be brief."},
        {"role": "user", "content": "More?"},
    ],
    [{"role": "user", "content": "List five fruits that are red."}],
]
# Raw Qwen-policy outputs: well formed, missing </think> (-> [NULL]), long, multi-turn, empty answer.
OUTPUTS = [
    "<think>\nA haiku has three lines.\n</think>\n\nWaves fold into foam<|im_end|>",
    "<think>\nI plan and plan and never close",
    "<think>\nshort\n</think>\n\n" + "Blue light scatters more than red light in the air. " * 3 + "<|im_end|>",
    "<think>\nadd tips\n</think>\n\nUse a clear subject line.<|im_end|><|endoftext|><|endoftext|>",
    "<think>\nnothing\n</think>\n\n<|im_end|>",
]
ANSWERS = [
    "Waves fold into foam",
    "[NULL]",
    "Blue light scatters more than red light in the air. " * 3,  # left-stripped only
    "Use a clear subject line.",
    "",
]


@pytest.fixture(scope="module")
def llama_scorer(llama_rm_dir):
    return RewardScorer.from_pretrained(llama_rm_dir[0], SETTINGS)


def test_qwen_policy_outputs_scored_by_llama_rm_match_transformers(llama_scorer, llama_rm_dir, qwen_tokenizer):
    policy_eos = eos_texts_of(qwen_tokenizer, [qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")])
    batch = llama_scorer.score_outputs(PROMPTS, OUTPUTS, TemplateSettings(mode="think", strict=True), policy_eos)
    assert batch.answers == ANSWERS
    conversations = [p + [{"role": "assistant", "content": a}] for p, a in zip(PROMPTS, ANSWERS)]
    expected, rows = torch_scores(llama_rm_dir[1], llama_scorer.tokenizer, conversations)
    assert len({len(r) for r in rows}) == len(rows)  # a batch mixing lengths and buckets
    assert len({bucket_for(len(r), SETTINGS.bucket_lengths()) for r in rows}) >= 2
    np.testing.assert_allclose(batch.rewards, expected, atol=1e-4, rtol=0)
    assert np.isfinite(batch.rewards[1]) and batch.rewards[1] == pytest.approx(expected[1], abs=1e-4)


def test_qwen_rm_scores_match_transformers(qwen_rm_dir):
    scorer = RewardScorer.from_pretrained(qwen_rm_dir[0], SETTINGS)
    rewards, truncated = scorer.score(PROMPTS[:3], ANSWERS[:3])
    conversations = [p + [{"role": "assistant", "content": a}] for p, a in zip(PROMPTS[:3], ANSWERS[:3])]
    expected, _ = torch_scores(qwen_rm_dir[1], scorer.tokenizer, conversations)
    np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)
    assert not truncated.any()


def test_rm_text_is_its_template_over_raw_prompt_messages_and_answer(llama_scorer):
    text = llama_scorer.render([{"role": "user", "content": "hi"}], "[NULL]")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[NULL]<|eot_id|>"
    )
    rows, _ = llama_scorer.encode([text])
    bos = llama_scorer.tokenizer.bos_token_id
    assert rows[0][0] == bos and rows[0].count(bos) == 1


def test_scoring_compiles_once_per_bucket_shape(llama_rm_dir):
    scorer = RewardScorer.from_pretrained(llama_rm_dir[0], RewardSettings(max_length=256, batch_size=2, min_bucket=64))
    short = [[{"role": "user", "content": "hi"}]]
    scorer.score(short, ["a"])
    scorer.score(short * 2, ["b", "c d"])
    assert scorer._forward._cache_size() == 1
    first = scorer.score(short * 3, ["a", "b", "c d"])[0]
    assert scorer._forward._cache_size() == 1
    scorer.score(short, ["long " * 60])
    assert scorer._forward._cache_size() == 2
    again = scorer.score(short * 3, ["a", "b", "c d"])[0]
    np.testing.assert_array_equal(first, again)


def test_long_rm_inputs_are_cut_to_max_length_and_counted(llama_rm_dir):
    settings = RewardSettings(max_length=80, batch_size=2, buckets=(80,))
    scorer = RewardScorer.from_pretrained(llama_rm_dir[0], settings)
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    answers = ["word " * 60, "ok"]
    rewards, truncated = scorer.score(prompts, answers)
    assert truncated.tolist() == [True, False]
    conversations = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    expected, rows = torch_scores(llama_rm_dir[1], scorer.tokenizer, conversations, max_length=80)
    assert len(rows[0]) == 80 and len(rows[1]) < 80
    np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)


def test_left_truncation_keeps_the_end_of_the_answer(llama_scorer):
    assert truncate([1, 2, 3, 4], 3, "left") == ([2, 3, 4], True)
    assert truncate([1, 2, 3, 4], 3, "right") == ([1, 2, 3], True)
    assert truncate([1, 2], 3, "right") == ([1, 2], False)


def test_batch_metrics_are_the_batch_means(llama_scorer, qwen_tokenizer):
    template = TemplateSettings(mode="think", strict=True)
    batch = llama_scorer.score_outputs(
        PROMPTS[:3], OUTPUTS[:3], template, ("<|im_end|>",), length_tokenizer=qwen_tokenizer
    )
    plan_lengths = [len(qwen_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in batch.plans]
    answer_lengths = [len(qwen_tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ANSWERS[:3]]
    assert batch.plans[0] == "A haiku has three lines."
    assert batch.valid.tolist() == [True, False, True]
    assert batch.metrics == pytest.approx(
        {
            "format_valid_rate": 2 / 3,
            "plan_tokens_mean": sum(plan_lengths) / 3,
            "answer_tokens_mean": sum(answer_lengths) / 3,
            "reward_truncated": 0.0,
            "reward_mean": float(np.mean(batch.rewards)),
            "reward_std": float(np.std(batch.rewards)),
        }
    )


def test_format_penalty_replaces_the_score_of_malformed_outputs_only(llama_scorer):
    template = TemplateSettings(mode="think", strict=True)
    scored = llama_scorer.score_outputs(PROMPTS[:3], OUTPUTS[:3], template, ("<|im_end|>",))
    penalised = llama_scorer.score_outputs(PROMPTS[:3], OUTPUTS[:3], template, ("<|im_end|>",), format_penalty=-1.5)
    assert penalised.rewards[1] == -1.5
    np.testing.assert_allclose(penalised.rewards[[0, 2]], scored.rewards[[0, 2]], atol=1e-6)
    assert penalised.metrics["reward_mean"] == pytest.approx(float(np.mean(penalised.rewards)))


def test_default_buckets_double_up_to_max_length():
    assert RewardSettings(max_length=1000, min_bucket=128).bucket_lengths() == (128, 256, 512, 1000)
    assert RewardSettings(max_length=512, min_bucket=128).bucket_lengths() == (128, 256, 512)
    assert bucket_for(129, (128, 256)) == 256


def test_right_pad_fills_short_batches_with_one_token_dummies():
    ids, mask = right_pad([[5, 6, 7], [8]], length=4, batch=3, pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"truncation_side": "middle"}, "reward truncation_side: 'middle'"),
        ({"batch_size": 0}, "reward batch_size"),
        ({"max_length": 512, "buckets": (128, 256)}, "reward buckets: the largest"),
    ],
)
def test_bad_reward_settings_name_the_setting(kwargs, message):
    with pytest.raises(UserError, match=message):
        RewardSettings(**kwargs)


def test_rm_directory_without_chat_template_is_a_user_error(llama_rm_dir, tmp_path):
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(llama_rm_dir[0], rm)
    (rm / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match=f"reward model {rm}: its tokenizer has no chat template"):
        RewardScorer.from_pretrained(rm, SETTINGS)


def test_missing_rm_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="reward model"):
        RewardScorer.from_pretrained(tmp_path / "nope", SETTINGS)


def test_a_reward_model_with_two_labels_needs_reward_label_and_scores_that_label(tmp_path, tiny_cache):
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    import models
    from rlmt_jax.inputs.tiny import tiny_assets_dir

    assets = tiny_assets_dir()
    config = dataclasses.replace(models.ModelConfig.from_pretrained(assets / "reward"), num_labels=2)
    path = tmp_path / "two_labels"
    models.save_pretrained(models.build_model(config, nnx.Rngs(3)), path, writer=True,
                           extra_files=sorted((assets / "tokenizer").iterdir()))
    settings = RewardSettings(max_length=64, batch_size=2, min_bucket=64)
    with pytest.raises(UserError, match=r"reward model .*two_labels: has num_labels=2; .*set reward.label"):
        RewardScorer.from_pretrained(path, settings)
    with pytest.raises(UserError, match=r"reward.label 'nope': .* labels \['LABEL_0', 'LABEL_1'\]"):
        RewardScorer.from_pretrained(path, dataclasses.replace(settings, label="nope"))

    scorer = RewardScorer.from_pretrained(path, dataclasses.replace(settings, label="LABEL_1"))
    rows = [[5, 6, 7], [8, 9]]
    ids, mask = right_pad(rows, 64, 2, scorer.pad_id)
    both = np.asarray(models.load_pretrained(path)(jnp.asarray(ids), jnp.asarray(mask)))  # [rows, 2 labels]
    assert not np.allclose(both[:, 0], both[:, 1])
    np.testing.assert_allclose(scorer.score_ids(rows), both[:, 1], atol=1e-6, rtol=0)
    by_index = RewardScorer.from_pretrained(path, dataclasses.replace(settings, label="1"))
    np.testing.assert_array_equal(by_index.score_ids(rows), scorer.score_ids(rows))
