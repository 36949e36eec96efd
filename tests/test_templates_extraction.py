"""Splitting plan from answer: a table of outputs, each mode, strict and not, as RECIPE.md specifies."""

import pytest

from rlmt_jax.inputs.templates import SplitOutput, TemplateSettings, remove_eos, split_output

EOS = ("<|eot_id|>", "<|im_end|>")

# (output, think strict, think non-strict, zero strict, zero non-strict, none)
TABLE = {
    "well formed": (
        "<think>\nplan A\n</think>\n\nThe answer.<|eot_id|>",
        "The answer.",
        "The answer.",
        "[NULL]",
        "<think>\nplan A\n</think>\n\nThe answer.",
        "<think>\nplan A\n</think>\n\nThe answer.",
    ),
    "zero well formed": (
        "<think> plan </think> <response> The answer. </response><|im_end|>",
        "<response> The answer. </response>",
        "<response> The answer. </response>",
        "The answer.",
        "The answer.",
        "<think> plan </think> <response> The answer. </response>",
    ),
    "no closing think": (
        "<think>\nI plan and plan",
        "[NULL]",
        "<think>\nI plan and plan",
        "[NULL]",
        "<think>\nI plan and plan",
        "<think>\nI plan and plan",
    ),
    "two closing thinks": (
        "<think>a</think> b </think> c",
        "b </think> c",
        "b </think> c",
        "[NULL]",
        "<think>a</think> b </think> c",
        "<think>a</think> b </think> c",
    ),
    "missing closing response": (
        "<think>p</think>\n<response>\npartial answer<|im_end|>",
        "<response>\npartial answer",
        "<response>\npartial answer",
        "partial answer",
        "partial answer",
        "<think>p</think>\n<response>\npartial answer",
    ),
    "two responses": (
        "<response>a</response><response>b</response>",
        "[NULL]",
        "<response>a</response><response>b</response>",
        "a",
        "a",
        "<response>a</response><response>b</response>",
    ),
    "empty answer": (
        "<think>p</think>\n\n<response></response><|eot_id|>",
        "<response></response>",
        "<response></response>",
        "",
        "",
        "<think>p</think>\n\n<response></response>",
    ),
    "empty think answer": (
        "<think>p</think>\n\n<|eot_id|>",
        "",
        "",
        "[NULL]",
        "<think>p</think>\n\n",
        "<think>p</think>\n\n",
    ),
    "truncated in the answer": (
        "<think>p</think>\n\nThe ans",
        "The ans",
        "The ans",
        "[NULL]",
        "<think>p</think>\n\nThe ans",
        "<think>p</think>\n\nThe ans",
    ),
    "eos then padding": (
        "<think>p</think> ok<|eot_id|><|eot_id|><|eot_id|>",
        "ok",
        "ok",
        "[NULL]",
        "<think>p</think> ok",
        "<think>p</think> ok",
    ),
    "eos text only": ("<|im_end|>", "[NULL]", "", "[NULL]", "", ""),
}


@pytest.mark.parametrize("case", list(TABLE))
@pytest.mark.parametrize(
    "column, mode, strict",
    [(1, "think", True), (2, "think", False), (3, "zero", True), (4, "zero", False), (5, "none", True)],
)
def test_answer_of_each_output_in_each_mode(case, column, mode, strict):
    output, expected = TABLE[case][0], TABLE[case][column]
    settings = TemplateSettings(mode=mode, strict=strict)
    assert split_output(output, settings, EOS).answer == expected


def test_none_mode_scores_whole_output_even_when_strict():
    assert split_output("Just an answer.<|eot_id|>", TemplateSettings(mode="none", strict=True), EOS) == SplitOutput(
        plan="", answer="Just an answer.", valid=True
    )


def test_think_split_returns_plan_without_tags_and_validity():
    settings = TemplateSettings(mode="think")
    assert split_output("<think>\nstep 1\nstep 2\n</think>\n\nHi!", settings) == SplitOutput(
        plan="step 1\nstep 2", answer="Hi!", valid=True
    )
    assert split_output("no tags at all", settings) == SplitOutput(plan="no tags at all", answer="[NULL]", valid=False)


def test_training_splits_at_the_first_delimiter_and_evaluation_at_the_last():
    # RLMT's reward worker keeps the text after the first `</think>`, its evaluation scripts after the last one
    twice = "<think>a</think> b </think> c<|eot_id|>"
    assert TemplateSettings().split == "first"  # what training scores
    assert split_output(twice, TemplateSettings(mode="think"), EOS) == SplitOutput(
        plan="a", answer="b </think> c", valid=True)
    assert split_output(twice, TemplateSettings(mode="think", split="last"), EOS) == SplitOutput(
        plan="a</think> b", answer="c", valid=True)
    responses = "<think>p</think> <response>draft</response> <response>final</response>"
    assert split_output(responses, TemplateSettings(mode="zero"), EOS).answer == "draft"
    assert split_output(responses, TemplateSettings(mode="zero", split="last"), EOS).answer == "final"
    assert split_output("no delimiter", TemplateSettings(mode="think", split="last"), EOS).answer == "[NULL]"


@pytest.mark.parametrize("output", ["<think>\n\n</think>\n\nThe answer.<|eot_id|>", "<think></think>The answer.",
                                    "</think>\n\nThe answer.", "  \n</think>The answer."])
@pytest.mark.parametrize("split", ["first", "last"])
def test_an_empty_plan_is_not_a_think_format_answer_in_strict_mode(output, split):
    strict = TemplateSettings(mode="think", strict=True, split=split)
    assert split_output(output, strict, EOS) == SplitOutput(plan="", answer="[NULL]", valid=False)
    lenient = TemplateSettings(mode="think", strict=False, split=split)  # not strict: the answer is kept
    assert split_output(output, lenient, EOS) == SplitOutput(plan="", answer="The answer.", valid=True)


def test_zero_split_plan_drops_both_think_tags():
    settings = TemplateSettings(mode="zero")
    split = split_output(" <think> weigh options </think> <response> Go left. </response>", settings)
    assert split == SplitOutput(plan="weigh options", answer="Go left.", valid=True)


def test_missing_closing_response_still_counts_as_valid_format():
    assert split_output("<response> cut off", TemplateSettings(mode="zero")).valid


def test_null_answer_text_and_delimiters_are_settings():
    settings = TemplateSettings(mode="think", null_answer="<invalid>", think_close="[/PLAN]")
    assert split_output("<think>x</think> y", settings).answer == "<invalid>"
    assert split_output("x [/PLAN]  y", settings).answer == "y"


def test_without_eos_texts_the_eos_stays_in_the_answer():
    settings = TemplateSettings(mode="think")
    assert split_output("<think>p</think> ok<|eot_id|>", settings, eos_texts=()).answer == "ok<|eot_id|>"


def test_remove_eos_cuts_at_the_earliest_of_several_eos_texts():
    assert remove_eos("ab<|im_end|>cd<|eot_id|>", EOS) == "ab"
    assert remove_eos("ab", EOS) == "ab"
