"""Prompt rendering with the real Llama-3.1 / Qwen2.5 chat templates and the paper's zero templates."""

import pytest
from fixtures_tokenizers import (  # noqa: F401  (pytest fixtures)
    llama_base_tokenizer,
    llama_base_tokenizer_dir,
    llama_tokenizer,
    llama_tokenizer_dir,
    qwen_base_tokenizer,
    qwen_base_tokenizer_dir,
    qwen_tokenizer,
    qwen_tokenizer_dir,
)

from rlmt_jax.inputs import templates as T
from rlmt_jax.core.errors import UserError

HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]

ZERO_THINK_INSTRUCTION = (
    "A conversation between User and Assistant. Following the User's query, the Assistant first plans a "
    "response, and then provides the response. The internal reasoning process is enclosed within "
    "<think> </think> tags and the response is enclosed within <response> </response> tags, i.e., in the "
    "format <think> reasoning process here </think> <response> response here </response>.\n\n"
)
ZERO_NOTHINK_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the assistant provides the "
    "user with a response. The response is enclosed within <response> </response> tags, i.e., "
    "<response> response here </response>.\n\n"
)


def test_llama31_instruct_prompt_has_default_system_header_and_generation_prompt(llama_tokenizer):
    assert T.render_prompt(llama_tokenizer, HAIKU) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWrite a haiku about the sea.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama31_instruct_template_trims_turns_and_places_system_message(llama_tokenizer):
    conversation = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": " hi \n"},
        {"role": "assistant", "content": "\n<think>p</think>\n\nhello "},
    ]
    text = llama_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<think>p</think>\n\nhello<|eot_id|>"
    )


def test_qwen25_instruct_prompt_adds_qwen_default_system_message(qwen_tokenizer):
    assert T.render_prompt(qwen_tokenizer, HAIKU) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen25_instruct_template_keeps_content_untrimmed(qwen_tokenizer):
    conversation = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": " yo "}]
    assert qwen_tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n hi <|im_end|>\n<|im_start|>assistant\n yo <|im_end|>\n"
    )


def test_zero_template_for_llama_base_renders_paper_text_with_bos_and_sets_eot_eos(llama_base_tokenizer):
    assert llama_base_tokenizer.eos_token == "<|end_of_text|>"
    tokenizer = T.prepare_policy_tokenizer(llama_base_tokenizer, T.TemplateSettings(mode="zero"))
    assert tokenizer.eos_token == "<|eot_id|>"
    assert T.render_prompt(tokenizer, HAIKU) == (
        "<|begin_of_text|>" + ZERO_THINK_INSTRUCTION + "User: <query>Write a haiku about the sea.</query>\nAssistant:"
    )


def test_zero_template_for_qwen_base_has_no_bos_and_sets_im_end_eos(qwen_base_tokenizer):
    assert qwen_base_tokenizer.eos_token == "<|endoftext|>"
    tokenizer = T.prepare_policy_tokenizer(qwen_base_tokenizer, T.TemplateSettings(mode="zero"))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert T.render_prompt(tokenizer, HAIKU) == (
        ZERO_THINK_INSTRUCTION + "User: <query>Write a haiku about the sea.</query>\nAssistant:"
    )


def test_zero_template_trims_queries_and_renders_every_user_turn(qwen_base_tokenizer):
    tokenizer = T.use_zero_template(qwen_base_tokenizer)
    conversation = [
        {"role": "user", "content": "  first \n"},
        {"role": "assistant", "content": " <think>p</think> <response>r</response> "},
        {"role": "user", "content": "second"},
    ]
    assert T.render_prompt(tokenizer, conversation) == (
        ZERO_THINK_INSTRUCTION + "User: <query>first</query>\n"
        "Assistant: <think>p</think> <response>r</response>User: <query>second</query>\nAssistant:"
    )


def test_zero_nothink_template_renders_the_non_thinking_instruction(qwen_base_tokenizer):
    tokenizer = T.prepare_policy_tokenizer(qwen_base_tokenizer, T.TemplateSettings(mode="zero", thinking=False))
    assert T.render_prompt(tokenizer, HAIKU) == (
        ZERO_NOTHINK_INSTRUCTION + "User: <query>Write a haiku about the sea.</query>\nAssistant:"
    )


def test_chat_mode_leaves_policy_tokenizer_template_and_eos_alone(llama_tokenizer):
    before = (llama_tokenizer.chat_template, llama_tokenizer.eos_token)
    for settings in (T.TemplateSettings(mode="think"), T.TemplateSettings(mode="none")):
        T.prepare_policy_tokenizer(llama_tokenizer, settings)
    assert (llama_tokenizer.chat_template, llama_tokenizer.eos_token) == before


def test_zero_template_with_chat_prompts_is_a_setting(llama_tokenizer):
    settings = T.TemplateSettings(mode="zero", prompt_template="chat")
    assert not settings.uses_zero_template
    assert T.TemplateSettings(mode="think", prompt_template="zero").uses_zero_template


def test_zero_eos_missing_from_vocab_is_a_user_error(llama_base_tokenizer):
    with pytest.raises(UserError, match="zero_eos_token"):
        T.zero_eos_token(llama_base_tokenizer, override="<|im_end|>")


def test_render_without_chat_template_is_a_user_error(llama_base_tokenizer):
    with pytest.raises(UserError, match="no chat template"):
        T.render_prompt(llama_base_tokenizer, HAIKU)


def test_truncate_left_keeps_the_last_ids_and_reports_it():
    assert T.truncate_left([1, 2, 3, 4, 5], 3) == ([3, 4, 5], True)
    assert T.truncate_left([1, 2, 3], 3) == ([1, 2, 3], False)
    assert T.truncate_left([], 2) == ([], False)


def test_encode_prompt_adds_no_second_bos_and_cuts_from_the_left(llama_tokenizer):
    full = T.encode_prompt(llama_tokenizer, HAIKU, max_tokens=10_000)
    bos = llama_tokenizer.bos_token_id
    assert not full.truncated
    assert full.ids[0] == bos and full.ids.count(bos) == 1
    assert llama_tokenizer.decode(full.ids) == T.render_prompt(llama_tokenizer, HAIKU)
    cut = T.encode_prompt(llama_tokenizer, HAIKU, max_tokens=7)
    assert cut.truncated and cut.ids == full.ids[-7:]
    assert llama_tokenizer.decode(cut.ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_messages_from_row_accepts_messages_or_prompt_text():
    assert T.messages_from_row({"prompt": "hi"}, "row 1") == [{"role": "user", "content": "hi"}]
    row = {"messages": [{"role": "user", "content": "a", "extra": 1}], "prompt": "ignored"}
    assert T.messages_from_row(row, "row 2") == [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"output": "x"}, "data.jsonl row 4: has neither `messages` nor `prompt`"),
        ({"messages": []}, "data.jsonl row 4: `messages` must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"data.jsonl row 4: messages\[0\] must have"),
        ({"prompt": 3}, "data.jsonl row 4: `prompt` must be text"),
    ],
)
def test_messages_from_bad_row_names_the_row(row, message):
    with pytest.raises(UserError, match=message):
        T.messages_from_row(row, "data.jsonl row 4")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "plan"}, "template mode: 'plan'"),
        ({"prompt_template": "base"}, "template prompt_template: 'base'"),
        ({"max_prompt_tokens": 0}, "template max_prompt_tokens"),
        ({"split": "middle"}, "template split: 'middle' is not one of first, last"),
    ],
)
def test_bad_template_settings_name_the_setting(kwargs, message):
    with pytest.raises(UserError, match=message):
        T.TemplateSettings(**kwargs)


def test_eos_texts_include_generation_stop_ids(llama_tokenizer):
    ids = llama_tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    assert T.eos_texts_of(llama_tokenizer, ids) == ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
