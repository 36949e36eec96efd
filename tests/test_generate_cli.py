"""A run dir copied anywhere exports and generates its own weights; `generate` writes AlpacaEval-ready records,
resumes, and `score` reads what it writes."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from models.hf_io import process_umask
from rlmt_jax.inputs import tiny
from rlmt_jax.run.checkpoint import params_only
from rlmt_jax.cli import main
from rlmt_jax.settings.config import resolve
from rlmt_jax.rollout.sampling import Sampler
from rlmt_jax.inputs.templates import KNOWN_EOS_TEXTS, TemplateSettings, split_output
from rlmt_jax.trainer.loop import train

SHORT = ["run.total_steps=2", "rollout.max_new_tokens=8", "rollout.prompts_per_step=4", "rollout.n=2",
         "checkpoint.async_save=false", "logging.tensorboard=false", "optimizer.micro_batch_size=8"]
PROMPTS = [  # AlpacaEval's eval set is a JSON list of these
    {"instruction": "Write a haiku about the sea.", "dataset": "helpful_base", "output": "a reference answer"},
    {"instruction": "Why is the sky blue?", "dataset": "oasst"},
    {"messages": [{"role": "user", "content": "Name a prime."}], "dataset": "vicuna"},
]
GENERATE = ["--max-new-tokens", "6", "--batch-size", "2"]


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory, tiny_cache) -> Path:
    """A short run trained in a folder of its own (relative run.output_dir and model.policy), copied to another
    folder as `my-run`; the original run dir and the policy folder it started from are deleted."""
    work = tmp_path_factory.mktemp("trained_here")
    shutil.copytree(tiny.tiny_assets_dir() / "policy", work / "model")
    before = os.getcwd()
    os.chdir(work)
    try:
        train(resolve(None, [*SHORT, "run.output_dir=runs/a", "model.policy=model"]))
    finally:
        os.chdir(before)
    copy = tmp_path_factory.mktemp("elsewhere") / "my-run"
    shutil.copytree(work / "runs" / "a", copy)
    shutil.rmtree(work)
    return copy


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "eval_set.json"
    path.write_text(json.dumps(PROMPTS))
    return path


@pytest.fixture(scope="module")
def generated(run_copy, prompts_file) -> list[dict]:
    """`generate --model RUN_DIR` into a .json file, read back as a list."""
    out = prompts_file.parent / "answers.json"
    assert main(["generate", "--model", str(run_copy), "--input", str(prompts_file), "--output", str(out),
                 *GENERATE]) == 0
    return json.loads(out.read_text())


def test_a_copied_run_dir_exports_its_own_checkpoint_from_any_folder(run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither where it trained nor where it is
    assert sorted(os.listdir(run_copy / "policy")) == [
        "chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert (run_copy / "policy").stat().st_mode & 0o777 == 0o777 & ~process_umask()  # not mkdtemp's 0700
    assert main(["export", str(run_copy), "--out", "exported"]) == 0
    ours = load_file(tmp_path / "exported" / "model.safetensors")
    at_the_end = load_file(run_copy / "export" / "model.safetensors")  # written by the run from its last step
    assert sorted(ours) == sorted(at_the_end)
    for name in ours:
        np.testing.assert_array_equal(ours[name], at_the_end[name], err_msg=name)
    checkpoint = params_only(run_copy)
    np.testing.assert_array_equal(ours["model.embed_tokens.weight"], checkpoint["model"]["embed"])
    assert "<|start_header_id|>" in (tmp_path / "exported" / "chat_template.jinja").read_text()


def test_a_run_dir_made_before_policy_copies_exports_with_its_model_folder(run_copy, tmp_path, capsys):
    old = tmp_path / "old-run"
    shutil.copytree(run_copy, old)
    shutil.rmtree(old / "policy")
    config = (old / "config.yaml").read_text()
    assert "{policy: model," in config
    (old / "config.yaml").write_text(config.replace("{policy: model,", "{policy: gone,"))
    assert main(["export", str(old), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rlmt-jax export: error: run dir {old} has no policy/ (made before rlmt-jax kept one) and its model.policy "
        "gone has no config.json: restore that folder to read the run"]
    (old / "config.yaml").write_text(config.replace("{policy: model,", "{policy: 'builtin:tiny-policy',"))
    assert main(["export", str(old), "--out", str(tmp_path / "x")]) == 0
    ours = load_file(tmp_path / "x" / "model.safetensors")
    at_the_end = load_file(run_copy / "export" / "model.safetensors")
    for name in at_the_end:
        np.testing.assert_array_equal(ours[name], at_the_end[name], err_msg=name)


def test_generate_loads_the_runs_newest_checkpoint(run_copy):
    import jax

    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.commands.generate import load_policy
    from rlmt_jax.settings.config import MeshConfig

    policy = load_policy(run_copy, None, "float32", mesh_lib.make_mesh(MeshConfig()))
    assert policy.generator == "my-run" and policy.weights.endswith("step 2")
    checkpoint = params_only(run_copy)
    np.testing.assert_array_equal(np.asarray(jax.device_get(policy.model.model.embed[...])),
                                  checkpoint["model"]["embed"])
    np.testing.assert_array_equal(np.asarray(jax.device_get(policy.model.lm_head[...])), checkpoint["lm_head"])


def test_generate_json_is_an_alpaca_eval_list_of_records_named_after_the_run(generated, prompts_file):
    table = pd.read_json(prompts_file.parent / "answers.json")
    assert list(table["instruction"]) == ["Write a haiku about the sea.", "Why is the sky blue?", "Name a prime."]
    assert list(table["dataset"]) == ["helpful_base", "oasst", "vicuna"]  # every input field is kept
    assert set(table["generator"]) == {"my-run"}
    assert {"output", "raw_output", "plan", "format_valid"} <= set(table.columns)
    strict = TemplateSettings(mode="think", strict=True)  # the tiny run's template: think, strict
    for row in generated:
        assert row["output"] == split_output(row["raw_output"], strict, KNOWN_EOS_TEXTS).answer
        if not row["format_valid"]:
            assert row["output"] == "[NULL]"
    assert generated[2]["messages"] == PROMPTS[2]["messages"]


def test_generate_from_the_export_names_the_run_and_samples_the_same_answers(run_copy, prompts_file, generated,
                                                                            tmp_path):
    out = tmp_path / "from_export.jsonl"  # not .json: JSON lines
    assert main(["generate", "--model", str(run_copy / "export"), "--input", str(prompts_file), "--output",
                 str(out), *GENERATE]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generated


def test_generate_resumes_after_the_rows_already_done(run_copy, prompts_file, generated, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "answers.json"
    calls = []
    real_call = Sampler.__call__

    def stopped_at_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    command = ["generate", "--model", str(run_copy), "--input", str(prompts_file), "--output", str(out), *GENERATE]
    with monkeypatch.context() as patch:
        patch.setattr(Sampler, "__call__", stopped_at_the_second_batch)
        with pytest.raises(KeyboardInterrupt):
            main(command)
    assert not out.exists()
    partial = tmp_path / "answers.json.partial"
    header, *done = partial.read_text().splitlines()
    assert [json.loads(line) for line in done] == generated[:2]
    settings = json.loads(header)["generate"]
    assert settings["temperature"] == 0.0 and settings["strict"] is True and settings["generator"] == "my-run"
    partial.write_text(json.dumps({"generate": {**settings, "temperature": 0.7}}) + "\n" + "\n".join(done) + "\n")
    capsys.readouterr()
    assert main(command) == 2  # made with other settings: said, and nothing is mixed
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rlmt-jax generate: error: {partial}: the unfinished answers for {out} were made with temperature=0.7, "
        "this run has 0.0: use the same settings, or delete the partial file to start again"]

    first = {**json.loads(done[0]), "output": "kept from the first run"}
    partial.write_text("\n".join([header, json.dumps(first), done[1], '{"instruction": "torn']))  # a torn write
    assert main(command) == 0
    assert "2/3 prompts already done" in capsys.readouterr().err
    assert json.loads(out.read_text()) == [first, *generated[1:]]  # rows done are not sampled again
    assert not partial.exists()


def test_score_reads_generates_json_output(run_copy, generated, prompts_file, tmp_path):
    from transformers import AutoTokenizer

    from rlmt_jax.inputs.templates import eos_texts_of

    reward = tiny.resolve_model_path("builtin:tiny-reward")
    out = tmp_path / "scored.json"
    assert main(["score", "--reward-model", reward, "--input", str(prompts_file.parent / "answers.json"),
                 "--output", str(out), "--batch-size", "4", "--max-length", "128",
                 "--policy-tokenizer", str(run_copy)]) == 0  # the run dir: the tokenizer it trained with
    scored = json.loads(out.read_text())
    assert [r["dataset"] for r in scored] == ["helpful_base", "oasst", "vicuna"]
    not_strict = TemplateSettings(mode="think", strict=False)
    eos_texts = eos_texts_of(AutoTokenizer.from_pretrained(run_copy / "policy"))
    assert eos_texts == ("<|eot_id|>",)
    for row, before in zip(scored, generated):
        assert row["answer"] == split_output(before["raw_output"], not_strict, eos_texts).answer
        assert row["format_valid"] == before["format_valid"] and isinstance(row["reward"], float)


def test_a_prompt_file_that_is_not_utf8_is_one_line_naming_the_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"instruction": "fine"}\n{"instruction": "caf\xe9"}\n')
    code = main(["generate", "--model", str(tmp_path), "--input", str(prompts), "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"rlmt-jax generate: error: {prompts} line 2: is not UTF-8 text (byte 0xe9 at "
                                 "column 21)"]
