"""Token sequences of the offline updates: which tokens carry the SFT loss, where DPO puts chosen and
rejected, how rows are padded and bucketed."""

import numpy as np
import pytest
from fixtures_tokenizers import (  # noqa: F401  (pytest fixtures)
    llama_tokenizer,
    llama_tokenizer_dir,
    qwen_tokenizer,
    qwen_tokenizer_dir,
)

from rlmt_jax.core.errors import UserError
from rlmt_jax.training.sequences import dpo_batch, length_bucket, right_padded, sft_batch, sft_tokens
from rlmt_jax.inputs.templates import encode_prompt

TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello you"},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Because."},
]


def masked_segments(tokenizer, ids, mask):
    """The decoded text of each run of mask == 1 (and of each run of mask == 0)."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            runs.append((mask[start], tokenizer.decode(ids[start:i], skip_special_tokens=False)))
            start = i
    return [text for m, text in runs if m], [text for m, text in runs if not m]


def test_sft_mask_covers_exactly_each_assistant_turn_and_its_end_of_turn(llama_tokenizer):
    ids, mask = sft_tokens(llama_tokenizer, TWO_TURNS)
    learned, prompts = masked_segments(llama_tokenizer, ids, mask)
    assert learned == ["Hello you<|eot_id|>", "Because.<|eot_id|>"]
    assert prompts[1] == "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>" \
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"
    # the whole conversation, in order, as the template renders it
    assert llama_tokenizer.decode(ids, skip_special_tokens=False) == llama_tokenizer.apply_chat_template(
        TWO_TURNS, tokenize=False)
    # the first prompt's ids are the ones the policy is prompted with at RL time
    prompt = encode_prompt(llama_tokenizer, TWO_TURNS[:1], 10_000).ids
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt) and mask[len(prompt)] == 1


def test_sft_mask_with_the_qwen_template(qwen_tokenizer):
    ids, mask = sft_tokens(qwen_tokenizer, TWO_TURNS)
    learned, prompts = masked_segments(qwen_tokenizer, ids, mask)
    # the "\n" the template puts after <|im_end|> is not learned: the policy stops at <|im_end|>
    assert learned == ["Hello you<|im_end|>", "Because.<|im_end|>"]
    assert ids[-1] == qwen_tokenizer.convert_tokens_to_ids("\u010a") and mask[-1] == 0  # "\n", byte-level BPE
    assert prompts[1] == "\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen_tokenizer.decode(ids, skip_special_tokens=False) == qwen_tokenizer.apply_chat_template(
        TWO_TURNS, tokenize=False)
    assert "You are Qwen" in prompts[0] and prompts[0].endswith("Hi there<|im_end|>\n<|im_start|>assistant\n")


def test_sft_conversation_without_an_assistant_turn_is_a_named_error(llama_tokenizer):
    with pytest.raises(UserError, match="SFT conversation 7: has no assistant turn"):
        sft_tokens(llama_tokenizer, TWO_TURNS[:1], "SFT conversation 7")


def test_length_bucket_is_the_next_power_of_two_capped_at_the_limit():
    assert [length_bucket(n, 4096) for n in (1, 64, 65, 128, 129, 3000)] == [64, 64, 128, 128, 256, 4096]
    assert length_bucket(5000, 4096) == 4096 and length_bucket(70, 100) == 100
    assert length_bucket(3, 4096, smallest=4) == 4 and length_bucket(5, 4096, smallest=4) == 8


def test_right_padded_rows_are_left_aligned_and_cut():
    out = right_padded([[1, 2, 3], [4], []], 2, 9)
    assert out.dtype == np.int32 and out.tolist() == [[1, 2], [4, 9], [9, 9]]


def test_sft_batch_aligns_the_loss_mask_with_the_tokens_and_never_counts_the_first():
    examples = [([5, 6, 7, 8], [1, 0, 1, 1]), ([9, 10], [0, 1])]
    batch = sft_batch(examples, max_tokens=6, pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    # token t carries loss where it is an assistant token; token 0 has no prediction
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]]
    long = sft_batch([(list(range(1, 71)), [0] * 60 + [1] * 10)], max_tokens=4096, pad_id=0)
    assert long["tokens"].shape == (1, 128) and long["loss_mask"][0, 60:70].tolist() == [1] * 10
    assert long["loss_mask"].sum() == 10 and long["attention_mask"].sum() == 70


def test_dpo_batch_puts_chosen_at_index_0_and_rejected_at_index_1():
    pairs = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10]},
    ]
    batch = dpo_batch(pairs, max_tokens=8, pad_id=0)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 2, 8) for k in batch}
    assert batch["tokens"].tolist() == [
        [[1, 2, 3, 4, 5, 0, 0, 0], [1, 2, 6, 0, 0, 0, 0, 0]],
        [[7, 8, 0, 0, 0, 0, 0, 0], [7, 9, 10, 0, 0, 0, 0, 0]],
    ]
    assert batch["response_mask"].tolist() == [
        [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]],
        [[0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]],
    ]
    assert batch["attention_mask"].tolist() == [
        [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]],
        [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]],
    ]
    assert dpo_batch(pairs[:1], max_tokens=4096, pad_id=0)["tokens"].shape == (1, 2, 64)  # bucketed
