"""Prompt rendering and plan/answer splitting, exactly as the RLMT recipe does it (pure text, no JAX).

Prompts: the policy tokenizer's own chat template with `add_generation_prompt=True` (no system prompt added,
nothing prefilled), or for base models the paper's plain-text "zero" template, which replaces the
tokenizer's chat template and changes its EOS to `<|eot_id|>` (Llama) or `<|im_end|>` (Qwen).
Prompt token ids are cut from the left to the prompt limit.

Outputs: the policy's EOS text is removed first, then the answer is split from the plan:
  think  the text after the FIRST `</think>`, left-stripped;
  zero   the text between the first `<response>` and the next `</response>` (to the end when that is
         missing), stripped;
  none   the whole output (the non-thinking RLHF baseline).
That is the split of the recipe's reward worker (training, `split="first"`); its evaluation scripts keep
the text after the LAST delimiter instead (`split="last"`, what `rlmt-jax generate` does by default).
A missing delimiter gives the literal `[NULL]` in strict mode (the reward model scores it) and the
whole output otherwise. In strict think mode an empty plan (only whitespace between `<think>` and
`</think>`, or before `</think>`) is no plan at all: the answer is `[NULL]` and the output not
format-valid, as without the delimiter.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlmt_jax.core.errors import UserError

TEMPLATE_DIR = Path(__file__).parent.parent / "resources" / "chat_templates"
BUILTIN_TEMPLATES = {
    "llama-3.1-instruct": "llama-3.1-instruct.jinja",
    "qwen2.5-instruct": "qwen2.5-instruct.jinja",
    "zero-think": "zero-think.jinja",
    "zero-nothink": "zero-nothink.jinja",
}
ANSWER_MODES = ("think", "zero", "none")
# Where the answer starts when the delimiter occurs more than once: after the first (the reward worker, training)
# or after the last (the paper's evaluation scripts).
SPLITS = ("first", "last")
PROMPT_TEMPLATES = ("chat", "zero")
# The zero template's EOS, by family; with none named, the first of these the base tokenizer knows.
ZERO_EOS_BY_FAMILY = {"llama": "<|eot_id|>", "qwen": "<|im_end|>"}
ZERO_EOS_TOKENS = tuple(ZERO_EOS_BY_FAMILY.values())
# EOS texts of the Llama-3.x and Qwen2.5 families, for callers that do not have the policy tokenizer.
KNOWN_EOS_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class TemplateSettings:
    """How prompts are rendered and how outputs are split into plan and answer.

    mode: think | zero | none, how the answer is found in the output (module docstring).
    strict: a missing delimiter gives `null_answer` (True) or the whole output (False); in think mode an
        empty plan gives `null_answer` too (True).
    split: the answer follows the first delimiter (`first`, the reward worker's split, for training) or the
        last one (`last`, the evaluation scripts' split).
    prompt_template: chat (the policy tokenizer's own) | zero (the paper's plain-text one); None picks
        zero for mode zero and chat otherwise.
    thinking: with the zero template, ask for a plan and a response (True) or a response only (the
        non-thinking baseline, False).
    max_prompt_tokens: prompt limit; longer prompts lose tokens from the left.
    zero_eos_token: EOS of the zero template; None takes `<|eot_id|>` or `<|im_end|>`, whichever the
        tokenizer has.
    """

    mode: str = "think"
    strict: bool = True
    prompt_template: str | None = None
    thinking: bool = True
    max_prompt_tokens: int = 1024
    null_answer: str = "[NULL]"
    think_open: str = "<think>"
    think_close: str = "</think>"
    response_open: str = "<response>"
    response_close: str = "</response>"
    zero_eos_token: str | None = None
    split: str = "first"

    def __post_init__(self):
        if self.mode not in ANSWER_MODES:
            raise UserError(f"template mode: {self.mode!r} is not one of {', '.join(ANSWER_MODES)}")
        if self.split not in SPLITS:
            raise UserError(f"template split: {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.prompt_template is not None and self.prompt_template not in PROMPT_TEMPLATES:
            raise UserError(
                f"template prompt_template: {self.prompt_template!r} is not one of {', '.join(PROMPT_TEMPLATES)}"
            )
        if self.max_prompt_tokens < 1:
            raise UserError(f"template max_prompt_tokens: must be at least 1, got {self.max_prompt_tokens}")
        for name in ("think_close", "response_open", "response_close"):
            if not getattr(self, name):
                raise UserError(f"template {name}: must not be empty")

    @property
    def uses_zero_template(self) -> bool:
        return (self.prompt_template or ("zero" if self.mode == "zero" else "chat")) == "zero"


@functools.cache
def builtin_chat_template(name: str) -> str:
    """The text of a shipped chat template: llama-3.1-instruct, qwen2.5-instruct, zero-think, zero-nothink."""
    if name not in BUILTIN_TEMPLATES:
        raise UserError(f"chat template {name!r} is not shipped; shipped: {', '.join(BUILTIN_TEMPLATES)}")
    return (TEMPLATE_DIR / BUILTIN_TEMPLATES[name]).read_text(encoding="utf-8")


def zero_chat_template(thinking: bool = True) -> str:
    """The paper's plain-text template for base models, with or without the plan instruction."""
    return builtin_chat_template("zero-think" if thinking else "zero-nothink")


def zero_eos_token(tokenizer, override: str | None = None) -> str:
    """The zero template's EOS for this tokenizer: `<|eot_id|>` for Llama, `<|im_end|>` for Qwen."""
    vocab = tokenizer.get_vocab()
    candidates = (override,) if override else ZERO_EOS_TOKENS
    for token in candidates:
        if token in vocab:
            return token
    raise UserError(
        f"zero template: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has none of the EOS tokens "
        f"{', '.join(candidates)}; set template.zero_eos_token to one it has"
    )


def use_zero_template(tokenizer, thinking: bool = True, eos_token: str | None = None):
    """Replace the tokenizer's chat template by the zero template and set its EOS (in place; returns it)."""
    tokenizer.chat_template = zero_chat_template(thinking)
    tokenizer.eos_token = zero_eos_token(tokenizer, eos_token)
    return tokenizer


def prepare_policy_tokenizer(tokenizer, settings: TemplateSettings):
    """The policy tokenizer ready to render prompts: zero template and EOS swapped in when asked for."""
    if settings.uses_zero_template:
        use_zero_template(tokenizer, settings.thinking, settings.zero_eos_token)
    return tokenizer


def messages_from_row(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The prompt conversation of a data row: its `messages` list, or its `prompt` (else `instruction`) text as
    one user turn.

    `where` names the row in errors, e.g. "prompts.jsonl row 7".
    """
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
        checked = []
        for i, message in enumerate(messages):
            if (
                not isinstance(message, Mapping)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise UserError(f"{where}: messages[{i}] must have a string `role` and a string `content`")
            checked.append({"role": message["role"], "content": message["content"]})
        return checked
    for key in ("prompt", "instruction"):  # `instruction`: AlpacaEval's field
        if row.get(key) is not None:
            if not isinstance(row[key], str):
                raise UserError(f"{where}: `{key}` must be text")
            return [{"role": "user", "content": row[key]}]
    raise UserError(f"{where}: has neither `messages` nor `prompt` (nor AlpacaEval's `instruction`)")


def render_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text the policy continues: its chat template with the generation prompt, nothing more."""
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def truncate_left(ids: Sequence[int], limit: int) -> tuple[list[int], bool]:
    """The last `limit` ids, and whether any were dropped."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids, False
    return ids[len(ids) - limit :], True


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt's token ids (left-truncated to the limit) and whether it was truncated."""

    ids: list[int]
    truncated: bool


def encode_prompt(tokenizer, messages: Sequence[Mapping[str, str]], max_tokens: int) -> EncodedPrompt:
    """Render with the chat template, tokenize without adding special tokens again, cut from the left."""
    text = render_prompt(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, truncated = truncate_left(ids, max_tokens)
    return EncodedPrompt(ids=ids, truncated=truncated)


def eos_texts_of(tokenizer, eos_token_ids: Sequence[int] = ()) -> tuple[str, ...]:
    """The EOS texts a policy's outputs may end with: the tokenizer's EOS and those of the given stop ids.

    Llama-3.1-Instruct stops on `<|eot_id|>`, `<|eom_id|>` and `<|end_of_text|>` (generation config),
    though its tokenizer names only the first.
    """
    texts = [tokenizer.eos_token] if tokenizer.eos_token else []
    texts += [tokenizer.convert_ids_to_tokens(int(i)) for i in eos_token_ids]
    return tuple(dict.fromkeys(t for t in texts if t))


def remove_eos(output: str, eos_texts: Sequence[str]) -> str:
    """The output up to the first EOS text (the sampler stops there; anything after is padding)."""
    cut = len(output)
    for eos in eos_texts:
        if eos:
            at = output.find(eos)
            if at != -1:
                cut = min(cut, at)
    return output[:cut]


@dataclasses.dataclass(frozen=True)
class SplitOutput:
    """A policy output split into its plan and the answer the reward model sees.

    valid: the output has the mode's delimiter (`</think>` / `<response>`), and in strict think mode a plan
        before it; always True for mode none.
    """

    plan: str
    answer: str
    valid: bool


def _strip_tag(text: str, tag: str) -> str:
    text = text.strip()
    if tag and text.startswith(tag):
        text = text[len(tag) :]
    return text.strip()


def split_output(output: str, settings: TemplateSettings, eos_texts: Sequence[str] = ()) -> SplitOutput:
    """Plan and answer of one decoded policy output (EOS text removed first), per `settings.mode`, after the
    first or the last delimiter (`settings.split`)."""
    text = remove_eos(output, eos_texts)
    if settings.mode == "none":
        return SplitOutput(plan="", answer=text, valid=True)
    delimiter = settings.think_close if settings.mode == "think" else settings.response_open
    at = text.rfind(delimiter) if settings.split == "last" else text.find(delimiter)
    if at == -1:
        answer = settings.null_answer if settings.strict else text
        return SplitOutput(plan=_strip_tag(text, settings.think_open), answer=answer, valid=False)
    before, after = text[:at], text[at + len(delimiter) :]
    if settings.mode == "think":
        plan = _strip_tag(before, settings.think_open)
        if settings.strict and not plan:  # `<think>\n\n</think>`: no plan, as if the delimiter were missing
            return SplitOutput(plan="", answer=settings.null_answer, valid=False)
        return SplitOutput(plan=plan, answer=after.lstrip(), valid=True)
    close = after.find(settings.response_close)
    answer = after if close == -1 else after[:close]
    plan = _strip_tag(before, settings.think_open)
    if plan.endswith(settings.think_close):
        plan = plan[: -len(settings.think_close)].rstrip()
    return SplitOutput(plan=plan, answer=answer.strip(), valid=True)


def reward_messages(messages: Sequence[Mapping[str, str]], answer: str) -> list[dict[str, str]]:
    """The conversation the reward model scores: the raw prompt messages plus the answer as the assistant."""
    return [{"role": m["role"], "content": m["content"]} for m in messages] + [
        {"role": "assistant", "content": answer}
    ]
