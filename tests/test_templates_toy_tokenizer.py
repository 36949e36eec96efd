"""The toy tokenizer factory builds real HF fast tokenizers that load offline and behave like the families."""

import json

import pytest
from fixtures_tokenizers import llama_tokenizer, llama_tokenizer_dir, qwen_tokenizer, qwen_tokenizer_dir  # noqa: F401

from rlmt_jax.core.errors import UserError
from rlmt_jax.inputs.templates import builtin_chat_template
from rlmt_jax.inputs.toy_tokenizer import ToyTokenizerSpec, build_toy_tokenizer


def test_llama_style_tokenizer_has_llama31_specials_bos_eos_pad(llama_tokenizer):
    tok = llama_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"):
        assert tok.tokenize(special) == [special]
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    assert tok("hi", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    assert tok.chat_template == builtin_chat_template("llama-3.1-instruct")


def test_qwen_style_tokenizer_has_no_bos_and_im_end_eos(qwen_tokenizer):
    tok = qwen_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    assert tok.tokenize("<|im_start|>") == ["<|im_start|>"]
    assert tok.chat_template == builtin_chat_template("qwen2.5-instruct")


def test_think_tags_are_plain_text_by_default_and_decode_exactly(llama_tokenizer):
    text = "<think>\nplan\n</think>\n\nanswer  with  spaces<|eot_id|>"
    assert "<think>" not in llama_tokenizer.tokenize("<think>")
    ids = llama_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llama_tokenizer.decode(ids) == text


def test_added_think_tags_are_single_tokens_that_survive_skip_special(tmp_path):
    tok = build_toy_tokenizer(tmp_path / "t", ToyTokenizerSpec(think_tags="added"))
    assert tok.tokenize("<think>a</think>") == ["<think>", "a", "</think>"]
    ids = tok("<think>a</think><|eot_id|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"


def test_same_spec_builds_byte_identical_tokenizer_files(tmp_path, llama_tokenizer_dir):
    build_toy_tokenizer(tmp_path / "again", ToyTokenizerSpec(family="llama3"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "again" / name).read_bytes() == (llama_tokenizer_dir / name).read_bytes()


def test_saved_directory_names_the_special_tokens(llama_tokenizer_dir):
    config = json.loads((llama_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|eot_id|>" and config["pad_token"] == "<|finetune_right_pad_id|>"


def test_vocab_size_and_custom_template_are_honoured(tmp_path):
    spec = ToyTokenizerSpec(family="qwen2", vocab_size=300, chat_template="zero-think", lines=("abc abc abd",) * 3)
    tok = build_toy_tokenizer(tmp_path / "t", spec)
    assert len(tok) <= 300
    assert tok.chat_template == builtin_chat_template("zero-think")


def test_llama_base_variant_has_no_chat_template_and_end_of_text_eos(tmp_path):
    tok = build_toy_tokenizer(tmp_path / "t", ToyTokenizerSpec(variant="base"))
    assert tok.chat_template is None and tok.eos_token == "<|end_of_text|>"


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="toy tokenizer family: 'gpt2'"):
        ToyTokenizerSpec(family="gpt2")
