"""Tiny real tokenizers for tests and the CPU default: byte-level BPE trained on a few fixed lines.

The result is a Hugging Face fast-tokenizer directory that `AutoTokenizer.from_pretrained(dir)` loads
offline, with the special tokens of the family it imitates, its BOS/EOS/pad, and a chat template
(the real Llama-3.1-Instruct or Qwen2.5-Instruct one by default). BPE training has no randomness, so
the same spec gives the same tokenizer.

The think tags are plain text by default, as in the real Llama and Qwen tokenizers (no `<think>` token);
`think_tags="added"` makes `<think>`, `</think>`, `<response>`, `</response>` single (non-special) tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rlmt_jax.core.errors import UserError
from rlmt_jax.inputs.templates import builtin_chat_template

FAMILIES = ("llama3", "qwen2")
VARIANTS = ("instruct", "base")
THINK_TAG_KINDS = ("text", "added")
TAG_TOKENS = ("<think>", "</think>", "<response>", "</response>")

# Llama-3.1 special tokens (a subset of its 256 reserved ones) and the Qwen2.5 chat tokens.
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

DEFAULT_LINES = (
    "A conversation between User and Assistant.",
    "Following the User's query, the Assistant first plans a response, and then provides the response.",
    "<think>\nThe user wants a short answer. I will plan it first.\n</think>\n\nHere is the answer.",
    "<think> reasoning process here </think> <response> response here </response>",
    "User: <query>Write a haiku about the sea.</query>\nAssistant:",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system user assistant",
    "Write a short poem about autumn leaves falling in the park.",
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for writing clear emails to a busy manager.",
    "What is the capital of France? The capital of France is Paris.",
    "Summarize the plot of a mystery novel in one paragraph.",
    "Translate 'good morning' into Spanish, French and German.",
    "List five fruits that are red and explain which one is sweetest.",
    "How do I bake a cake? Mix flour, sugar, eggs and butter, then bake for thirty minutes.",
    "Plan: greet the user, answer the question, keep it brief and friendly.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Thank you! I hope this helps. Let me know if you have more questions.",
)


@dataclasses.dataclass(frozen=True)
class ToyTokenizerSpec:
    """What tokenizer to build.

    family: llama3 | qwen2, whose special tokens, BOS/EOS/pad and chat template to imitate.
    variant: instruct (EOS `<|eot_id|>` / `<|im_end|>`) | base (EOS `<|end_of_text|>` / `<|endoftext|>`;
        the Llama base tokenizer has no chat template, the Qwen base one has Qwen's).
    chat_template: a shipped template name (templates.BUILTIN_TEMPLATES) or Jinja text; None: the
        family's default for the variant; "" for none.
    """

    family: str = "llama3"
    variant: str = "instruct"
    vocab_size: int = 512
    think_tags: str = "text"
    chat_template: str | None = None
    lines: tuple[str, ...] = DEFAULT_LINES
    model_max_length: int = 131072

    def __post_init__(self):
        for name, allowed in (("family", FAMILIES), ("variant", VARIANTS), ("think_tags", THINK_TAG_KINDS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"toy tokenizer {name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.lines:
            raise UserError("toy tokenizer lines: need at least one training line")


def _special_tokens(spec: ToyTokenizerSpec) -> dict[str, str | None]:
    if spec.family == "llama3":
        eos = "<|eot_id|>" if spec.variant == "instruct" else "<|end_of_text|>"
        return {"bos_token": "<|begin_of_text|>", "eos_token": eos, "pad_token": "<|finetune_right_pad_id|>"}
    eos = "<|im_end|>" if spec.variant == "instruct" else "<|endoftext|>"
    return {"bos_token": None, "eos_token": eos, "pad_token": "<|endoftext|>"}


def _chat_template(spec: ToyTokenizerSpec) -> str | None:
    if spec.chat_template is None:
        if spec.family == "llama3":
            return builtin_chat_template("llama-3.1-instruct") if spec.variant == "instruct" else None
        return builtin_chat_template("qwen2.5-instruct")
    if spec.chat_template == "":
        return None
    if "{" not in spec.chat_template:
        return builtin_chat_template(spec.chat_template)
    return spec.chat_template


def train_bpe(spec: ToyTokenizerSpec) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on the spec's lines, specials first in the vocab."""
    specials = LLAMA3_SPECIALS if spec.family == "llama3" else QWEN2_SPECIALS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(spec.lines), trainer)
    if spec.think_tags == "added":
        tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    if spec.family == "llama3":
        bos = "<|begin_of_text|>"
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def build_toy_tokenizer(out_dir: str | Path, spec: ToyTokenizerSpec = ToyTokenizerSpec()):
    """Train, save to `out_dir` as a Hugging Face tokenizer directory, and return it loaded from there."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(spec), model_max_length=spec.model_max_length, **_special_tokens(spec)
    )
    template = _chat_template(spec)
    if template is not None:
        fast.chat_template = template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
