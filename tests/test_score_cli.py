"""`rlmt-jax score` end to end: JSONL in, answers and rewards out; bad input gives clear errors, no partial file."""

import json
import shutil

import numpy as np
import pytest
from fixtures_reward_models import llama_rm_dir, torch_scores  # noqa: F401  (pytest fixtures)
from fixtures_tokenizers import qwen_tokenizer_dir  # noqa: F401

from rlmt_jax.cli import main

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
     "output": "<think>\nthree lines\n</think>\n\nWaves fold into foam<|im_end|>"},
    {"id": "b", "prompt": "hi", "output": "<think>\nnever closed"},
    {"id": "c", "prompt": "Explain why the sky is blue.", "output": "<think>x</think>Blue light scatters.<|eot_id|>"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def score(rm_dir, input_path, output_path, *extra):
    return main(["score", "--reward-model", str(rm_dir), "--input", str(input_path), "--output", str(output_path),
                 "--batch-size", "2", "--max-length", "256", *extra])


def test_score_writes_answers_and_rewards_equal_to_transformers(llama_rm_dir, tmp_path, capsys):
    rm_dir, torch_model = llama_rm_dir
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert score(rm_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--mode", "think", "--strict") == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["a", "b", "c"]
    assert [r["answer"] for r in out] == ["Waves fold into foam", "[NULL]", "Blue light scatters."]
    assert [r["format_valid"] for r in out] == [True, False, True]
    assert out[1]["prompt"] == "hi" and out[0]["output"] == ROWS[0]["output"]
    from transformers import AutoTokenizer

    user = ["Write a haiku about the sea.", "hi", "Explain why the sky is blue."]
    answers = ["Waves fold into foam", "[NULL]", "Blue light scatters."]
    conversations = [
        [{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in zip(user, answers)
    ]
    expected, _ = torch_scores(torch_model, AutoTokenizer.from_pretrained(str(rm_dir)), conversations)
    np.testing.assert_allclose([r["reward"] for r in out], expected, atol=1e-4, rtol=0)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 3 and summary["format_valid_rate"] == pytest.approx(2 / 3)
    assert summary["reward_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-4)


def test_score_without_strict_scores_the_whole_output(llama_rm_dir, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ROWS[1:2])
    assert score(llama_rm_dir[0], tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 0
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["answer"] == "<think>\nnever closed" and row["format_valid"] is False


def test_policy_tokenizer_decides_which_eos_text_is_removed(llama_rm_dir, qwen_tokenizer_dir, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    extra = ("--strict", "--policy-tokenizer", str(qwen_tokenizer_dir))
    assert score(llama_rm_dir[0], tmp_path / "in.jsonl", tmp_path / "out.jsonl", *extra) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in out] == ["Waves fold into foam", "[NULL]", "Blue light scatters.<|eot_id|>"]


def test_score_reads_a_json_list_of_generate_records_and_scores_their_raw_output(llama_rm_dir, tmp_path):
    # generate's rows: `instruction` is the prompt, `output` the answer alone, `raw_output` the whole text
    rows = [{"instruction": "hi", "output": "[NULL]", "raw_output": ROWS[1]["output"], "generator": "run-a",
             "dataset": "oasst"},
            {"instruction": "Explain why the sky is blue.", "output": "Blue light scatters.",
             "raw_output": ROWS[2]["output"], "generator": "run-a", "dataset": "vicuna"}]
    (tmp_path / "in.json").write_text(json.dumps(rows, indent=1))
    assert score(llama_rm_dir[0], tmp_path / "in.json", tmp_path / "out.json", "--strict") == 0
    out = json.loads((tmp_path / "out.json").read_text())  # .json out: a list as well
    assert [r["answer"] for r in out] == ["[NULL]", "Blue light scatters."]
    assert [r["format_valid"] for r in out] == [False, True]
    assert [(r["dataset"], r["generator"]) for r in out] == [("oasst", "run-a"), ("vicuna", "run-a")]
    jsonl = tmp_path / "in.jsonl"
    write_jsonl(jsonl, rows)
    assert score(llama_rm_dir[0], jsonl, tmp_path / "again.jsonl", "--strict") == 0
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in again] == [r["reward"] for r in out]


def assert_failed_cleanly(capsys, tmp_path, code, message):
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    assert (tmp_path / "out.jsonl").read_text() == "previous results\n"


@pytest.fixture
def previous_output(tmp_path):
    (tmp_path / "out.jsonl").write_text("previous results\n")
    return tmp_path / "out.jsonl"


def test_row_without_output_names_the_row_and_leaves_output_alone(llama_rm_dir, tmp_path, capsys, previous_output):
    (tmp_path / "in.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "no output"}) + "\n")
    code = score(llama_rm_dir[0], tmp_path / "in.jsonl", previous_output)
    assert_failed_cleanly(capsys, tmp_path, code, f"{tmp_path / 'in.jsonl'} row 3: has no `output`")


def test_empty_input_file_is_named(llama_rm_dir, tmp_path, capsys, previous_output):
    (tmp_path / "in.jsonl").write_text("\n")
    code = score(llama_rm_dir[0], tmp_path / "in.jsonl", previous_output)
    assert_failed_cleanly(capsys, tmp_path, code, f"{tmp_path / 'in.jsonl'}: is empty")


def test_invalid_json_row_is_named(llama_rm_dir, tmp_path, capsys, previous_output):
    (tmp_path / "in.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    code = score(llama_rm_dir[0], tmp_path / "in.jsonl", previous_output)
    assert_failed_cleanly(capsys, tmp_path, code, "in.jsonl line 2: not valid JSON")


def test_row_without_prompt_is_named(llama_rm_dir, tmp_path, capsys, previous_output):
    write_jsonl(tmp_path / "in.jsonl", [{"output": "x"}])
    code = score(llama_rm_dir[0], tmp_path / "in.jsonl", previous_output)
    assert_failed_cleanly(capsys, tmp_path, code, "in.jsonl row 1: has neither `messages` nor `prompt`")


def test_reward_model_without_chat_template_is_named(llama_rm_dir, tmp_path, capsys, previous_output):
    rm = tmp_path.parent / f"{tmp_path.name}-rm"
    shutil.copytree(llama_rm_dir[0], rm)
    (rm / "chat_template.jinja").unlink()
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    code = score(rm, tmp_path / "in.jsonl", previous_output)
    assert_failed_cleanly(capsys, tmp_path, code, f"reward model {rm}: its tokenizer has no chat template")


def test_missing_input_file_is_named(llama_rm_dir, tmp_path, capsys):
    code = score(llama_rm_dir[0], tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    assert code == 2 and f"{tmp_path / 'nope.jsonl'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_failed_write_leaves_neither_partial_nor_temporary_file(tmp_path, previous_output):
    from rlmt_jax.core.jsonl import write_jsonl_atomic

    with pytest.raises(TypeError):
        write_jsonl_atomic(previous_output, [{"ok": 1}, {"not json": {1, 2}}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert previous_output.read_text() == "previous results\n"


def test_a_two_label_reward_model_is_scored_on_the_label_given(tiny_cache, tmp_path, capsys):
    import dataclasses

    from flax import nnx

    import models
    from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings
    from rlmt_jax.inputs.tiny import tiny_assets_dir

    assets = tiny_assets_dir()
    config = dataclasses.replace(models.ModelConfig.from_pretrained(assets / "reward"), num_labels=2)
    rm_dir = tmp_path / "two_labels"
    models.save_pretrained(models.build_model(config, nnx.Rngs(3)), rm_dir, writer=True,
                           extra_files=sorted((assets / "tokenizer").iterdir()))
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert score(rm_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl") == 2
    assert "has num_labels=2" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()

    rewards = {}
    for label in ("LABEL_0", "1"):
        assert score(rm_dir, tmp_path / "in.jsonl", tmp_path / f"{label}.jsonl", "--label", label) == 0
        rewards[label] = [json.loads(line)["reward"] for line in (tmp_path / f"{label}.jsonl").read_text().splitlines()]
    # what training scores with reward.label: the same rows through RewardScorer, per label
    settings = RewardSettings(max_length=256, batch_size=2)
    conversations = [json.loads(line) for line in (tmp_path / "1.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": r["messages"][0]["content"] if "messages" in r else r["prompt"]}]
               for r in conversations]
    answers = [r["answer"] for r in conversations]
    for label, index in (("LABEL_0", "0"), ("1", "1")):
        scorer = RewardScorer.from_pretrained(rm_dir, dataclasses.replace(settings, label=index))
        np.testing.assert_allclose(rewards[label], scorer.score(prompts, answers)[0], atol=1e-5, rtol=0)
    assert not np.allclose(rewards["LABEL_0"], rewards["1"])


def test_builtin_tiny_models_are_taken_by_name(tiny_cache, tmp_path, capsys):
    """`--reward-model builtin:tiny-reward` was read as a Hugging Face repo id."""
    from rlmt_jax.inputs.tiny import tiny_assets_dir

    write_jsonl(tmp_path / "in.jsonl", ROWS)
    args = ["--policy-tokenizer", "builtin:tiny-policy"]
    assert score("builtin:tiny-reward", tmp_path / "in.jsonl", tmp_path / "by_name.jsonl", *args) == 0
    assert score(tiny_assets_dir() / "reward", tmp_path / "in.jsonl", tmp_path / "by_path.jsonl",
                 "--policy-tokenizer", str(tiny_assets_dir() / "policy")) == 0
    assert (tmp_path / "by_name.jsonl").read_text() == (tmp_path / "by_path.jsonl").read_text()
    capsys.readouterr()
    assert score("builtin:tiny-rm", tmp_path / "in.jsonl", tmp_path / "x.jsonl") == 2
    assert capsys.readouterr().err.strip() == ("rlmt-jax score: error: unknown built-in model 'builtin:tiny-rm'; "
                                               "built-in models: builtin:tiny-policy, builtin:tiny-reward")
