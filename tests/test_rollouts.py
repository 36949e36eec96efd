"""From the run config and a rollout to what the trainer reads: template settings, stop ids, response texts,
the RL batch, the rollout metrics (rlmt_jax/rollout/scored.py) and the sampler-vs-trainer log-prob gap
(rlmt_jax/training/stage.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_tokenizers import llama_tokenizer, llama_tokenizer_dir  # noqa: F401  (pytest fixtures)

from rlmt_jax.settings.config import resolve
from rlmt_jax.core.errors import UserError
from rlmt_jax.rollout.scored import PolicyText, rl_batch, rollout_metrics, template_settings
from rlmt_jax.rollout.sampling import STOP_EOS, STOP_LENGTH, Rollout
from rlmt_jax.training.stage import logprob_gap


@pytest.mark.parametrize("overrides, expected", [
    (["template.mode=think", "template.strict=true"],
     dict(mode="think", strict=True, thinking=True, prompt_template="chat", zero_eos_token=None)),
    (["template.mode=zero", "template.zero_family=qwen", "template.strict=false"],
     dict(mode="zero", strict=False, thinking=True, prompt_template="zero", zero_eos_token="<|im_end|>")),
    (["template.mode=zero", "template.zero_family=llama"],
     dict(mode="zero", thinking=True, prompt_template="zero", zero_eos_token="<|eot_id|>")),
    (["template.mode=none", "template.strict=false", "template.format_penalty=null"],
     dict(mode="none", strict=False, thinking=False, prompt_template="chat", zero_eos_token=None)),
])
def test_template_settings_follow_the_run_config(overrides, expected):
    settings = template_settings(resolve(None, [*overrides, "data.max_prompt_tokens=77"]))
    assert {k: getattr(settings, k) for k in expected} == expected
    assert settings.max_prompt_tokens == 77


def think_text(llama_tokenizer, model_eos):
    return PolicyText.create(llama_tokenizer, template_settings(resolve(None, [])), model_eos)


def test_stop_ids_are_the_model_eos_ids_then_the_tokenizer_eos_once(llama_tokenizer):
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    end = llama_tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert llama_tokenizer.eos_token_id == eot
    assert think_text(llama_tokenizer, (end, eot)).stop_ids == (end, eot)
    assert think_text(llama_tokenizer, (end,)).stop_ids == (end, eot)
    assert think_text(llama_tokenizer, ()).stop_ids == (eot,)
    assert set(think_text(llama_tokenizer, (end,)).eos_texts) == {"<|eot_id|>", "<|end_of_text|>"}


def test_pad_id_is_the_tokenizer_pad_or_else_the_first_stop_id(llama_tokenizer):
    text = think_text(llama_tokenizer, (5,))
    assert text.pad_id == llama_tokenizer.pad_token_id != 5
    llama_tokenizer.pad_token = None
    assert think_text(llama_tokenizer, (5,)).pad_id == 5


def test_a_policy_without_any_eos_is_a_user_error(llama_tokenizer):
    llama_tokenizer.eos_token = None
    with pytest.raises(UserError, match="no EOS token"):
        think_text(llama_tokenizer, ())


def rollout(tokens, response_lengths, stop_reason, prompt_len=2):
    tokens = jnp.asarray(tokens, jnp.int32)
    cols = jnp.arange(tokens.shape[1])
    lengths = jnp.asarray(response_lengths, jnp.int32)
    response = (cols[None] >= prompt_len) & (cols[None] < prompt_len + lengths[:, None])
    prompt = (cols[None] < prompt_len) & (tokens != 0)
    logprobs = jnp.where(response, -0.5 - 0.25 * cols[None], 0.0)
    return Rollout(tokens, prompt, response, logprobs, jnp.sum(prompt, axis=1), lengths,
                   jnp.asarray(stop_reason, jnp.int32), prompt_len, 1)


def test_response_texts_are_each_row_cut_at_its_length(llama_tokenizer):
    a, b, c, d = llama_tokenizer.encode("the cat sat on a mat", add_special_tokens=False)[:4]
    r = rollout([[0, 7, a, b, c], [7, 8, d, c, 0]], [3, 1], [STOP_LENGTH, STOP_EOS])
    decode = llama_tokenizer.decode
    assert think_text(llama_tokenizer, ()).decode_responses(r) == [decode([a, b, c]), decode([d])]
    assert decode([a, b, c]) != decode([a, b]) and decode([d]) != decode([d, c])


def test_rl_batch_lays_out_the_rollout_as_int_masks_and_its_positions():
    r = rollout([[0, 7, 9, 9, 0], [7, 8, 9, 0, 0]], [2, 1], [STOP_EOS, STOP_EOS])
    batch = rl_batch(r)
    assert np.asarray(batch["tokens"]).tolist() == [[0, 7, 9, 9, 0], [7, 8, 9, 0, 0]]
    assert np.asarray(batch["attention_mask"]).tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert np.asarray(batch["response_mask"]).tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert np.asarray(batch["positions"]).tolist() == [[0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]
    assert batch["attention_mask"].dtype == batch["response_mask"].dtype == jnp.int32


def test_logprob_gap_is_over_response_tokens_only():
    trainer = jnp.array([[0.0, -1.0, -2.0, -3.0], [5.0, -1.0, -1.0, 0.0]])
    sampler = jnp.array([[9.0, -1.5, -2.0, -2.0], [0.0, -1.25, -1.0, 0.0]])
    mask = jnp.array([[0, 1, 1, 1], [0, 1, 0, 0]])
    gap = logprob_gap(trainer, sampler, mask)
    assert gap["logprob_diff_max"] == pytest.approx(1.0)
    assert gap["logprob_diff_mean"] == pytest.approx((0.5 + 0.0 + 1.0 + 0.25) / 4)
    assert logprob_gap(trainer, sampler, jnp.zeros_like(mask)) == {"logprob_diff_mean": 0.0, "logprob_diff_max": 0.0}


def test_rollout_metrics_count_length_stops_and_response_tokens():
    r = rollout(np.zeros((4, 6)), [4, 1, 2, 3], [STOP_LENGTH, STOP_EOS, STOP_EOS, STOP_EOS])
    assert rollout_metrics(r) == {"response_tokens_mean": 2.5, "response_tokens_max": 4.0, "length_stop_rate": 0.25}
