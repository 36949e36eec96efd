"""Token sequences for the offline updates: SFT conversations with assistant-only loss, DPO pairs.

Both pad to a few bucket lengths (powers of two up to the limit) so a run compiles a handful of programs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlmt_jax.core.errors import UserError


def length_bucket(length: int, limit: int, smallest: int = 64) -> int:
    """The smallest power of two >= length (at least `smallest`), capped at `limit`."""
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def sft_tokens(tokenizer, conversation: Sequence[dict], where: str = "conversation") -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a 0/1 mask of the assistant tokens (the ones SFT learns).

    Each assistant turn's tokens are those the template adds between the conversation up to it rendered with
    the generation prompt, and the conversation including it: exactly what the policy writes at RL time,
    its end-of-turn token included. Whitespace the template puts after that token (Qwen's "\n" after
    <|im_end|>) stays in the ids but is not learned: the policy stops at the token and never writes it.
    Segments are tokenized separately (the template's boundaries are special tokens), so prompt ids equal
    those the policy sees when it is prompted.
    """
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for turn, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(list(conversation[:turn]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(conversation[:turn + 1]), tokenize=False,
                                             add_generation_prompt=False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise UserError(f"{where}: the chat template does not render turn {turn} as a continuation of the "
                            "turns before it, so assistant tokens cannot be found")
        answer = full[len(prefix):]
        written = answer.rstrip()
        if not written.endswith(tuple(tokenizer.all_special_tokens)):  # no end-of-turn token: learn it all
            written = answer
        prompt_part, answer_part, after = (tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                                           for text in (prefix[len(rendered):], written, answer[len(written):]))
        ids += prompt_part + answer_part + after
        mask += [0] * len(prompt_part) + [1] * len(answer_part) + [0] * len(after)
        rendered = full
    if not any(mask):
        raise UserError(f"{where}: has no assistant turn to learn from")
    return ids, mask


def right_padded(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> np.ndarray:
    """[len(rows), length] int32, each row left-aligned (cut at `length`)."""
    out = np.full((len(rows), length), pad_id, np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:length]
        out[i, :len(row)] = row
    return out


def sft_batch(examples: Sequence[tuple[list[int], list[int]]], max_tokens: int, pad_id: int) -> dict[str, np.ndarray]:
    """SFT arrays [B, S]: tokens, attention_mask, loss_mask (aligned: 1 where token t is an assistant token)."""
    length = length_bucket(max(len(ids) for ids, _ in examples), max_tokens)
    tokens = right_padded([ids for ids, _ in examples], length, pad_id)
    attention = right_padded([[1] * len(ids) for ids, _ in examples], length, 0)
    loss_mask = right_padded([mask for _, mask in examples], length, 0)
    loss_mask[:, 0] = 0  # the first token has no prediction
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def dpo_batch(pairs: Sequence[dict], max_tokens: int, pad_id: int) -> dict[str, np.ndarray]:
    """DPO arrays from pair records {prompt_ids, chosen_ids, rejected_ids}: tokens, attention_mask,
    response_mask [P, 2, S] (index 0 chosen, 1 rejected; prompt then response, right-padded)."""
    rows, masks = [], []
    for pair in pairs:
        for response in (pair["chosen_ids"], pair["rejected_ids"]):
            rows.append(list(pair["prompt_ids"]) + list(response))
            masks.append([0] * len(pair["prompt_ids"]) + [1] * len(response))
    length = length_bucket(max(len(r) for r in rows), max_tokens)
    shape = (len(pairs), 2, length)
    return {
        "tokens": right_padded(rows, length, pad_id).reshape(shape),
        "attention_mask": right_padded([[1] * len(r) for r in rows], length, 0).reshape(shape),
        "response_mask": right_padded(masks, length, 0).reshape(shape),
    }
