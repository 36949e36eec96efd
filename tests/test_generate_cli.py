"""A run dir copied anywhere exports and generates its own weights; `generate` writes AlpacaEval-ready records
(split as the paper's evaluation splits), resumes, samples on every host of a multi-host run, reports while a
batch decodes, and `score` reads what it writes."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from clusters import finish_all, last_json_line, start_cluster
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


def interrupted(argv: list[str]) -> None:
    """`rlmt-jax ARGV` was stopped by a KeyboardInterrupt: exit status 130 (or the exception itself, where the
    command line lets it through)."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        return
    assert code == 130


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
    strict = TemplateSettings(mode="think", strict=True, split="last")  # the tiny run's template: think, strict
    for row in generated:
        assert row["output"] == split_output(row["raw_output"], strict, KNOWN_EOS_TEXTS).answer
        if not row["format_valid"]:
            assert row["output"] == "[NULL]"
    assert generated[2]["messages"] == PROMPTS[2]["messages"]


def test_generate_through_decode_slots_samples_the_static_batches_answers(run_copy, prompts_file, generated,
                                                                         tmp_path, monkeypatch, capsys):
    from rlmt_jax.commands import generate

    monkeypatch.setattr(generate, "PROGRESS_STEPS", 2)  # chunks of 2 steps, progress after each
    out = tmp_path / "slots.json"
    # all 3 prompts in one batch through one slot: the second and third take it as the one before stops
    assert main(["generate", "--model", str(run_copy), "--input", str(prompts_file), "--output", str(out),
                 "--max-new-tokens", "6", "--batch-size", "3", "--slots", "1", "--progress-seconds", "0.000001"]) == 0
    assert json.loads(out.read_text()) == generated
    decoding = [line for line in capsys.readouterr().err.splitlines() if " decoding: " in line]
    assert decoding[0].startswith("generate: batch 1/1 decoding: 3/6 tokens a row, 0/3 rows done, ")
    assert " 3/3 rows done, " in decoding[-1]


def test_generate_from_the_export_names_the_run_and_samples_the_same_answers(run_copy, prompts_file, generated,
                                                                            tmp_path):
    out = tmp_path / "from_export.jsonl"  # not .json: JSON lines
    # and without progress while a batch decodes: each batch's decode one program, not chunks of steps
    assert main(["generate", "--model", str(run_copy / "export"), "--input", str(prompts_file), "--output",
                 str(out), *GENERATE, "--progress-seconds", "0"]) == 0
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
        interrupted(command)
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


# ------------------------------------------------------------------------------------ what the rows say

TWICE = "<think>a</think> b </think> c<|eot_id|>"  # the delimiter twice
EMPTY_PLAN = "<think>\n\n</think>\n\nHi<|eot_id|>"


def outputs_of(texts):
    """PolicyText.decode_responses giving `texts` in turn, one per sampled row (the sampler still runs)."""
    from rlmt_jax.rollout.scored import PolicyText

    given = iter(texts)

    def decode_responses(self, rollout):
        return [next(given) for _ in range(rollout.tokens.shape[0])]

    return PolicyText, "decode_responses", decode_responses


def test_generate_splits_at_the_last_delimiter_as_the_evaluation_does_unless_told_first(run_copy, prompts_file,
                                                                                        tmp_path, monkeypatch):
    texts = [TWICE, EMPTY_PLAN, "no plan at all<|eot_id|>", "a filler row"]
    answers = {}
    for split in ("last", "first"):
        out = tmp_path / f"{split}.json"
        flags = [] if split == "last" else ["--split", "first"]
        with monkeypatch.context() as patch:
            patch.setattr(*outputs_of(texts))
            assert main(["generate", "--model", str(run_copy), "--input", str(prompts_file), "--output", str(out),
                         *GENERATE, *flags]) == 0
        answers[split] = [(r["plan"], r["output"], r["format_valid"]) for r in json.loads(out.read_text())]
    assert answers["last"] == [("a</think> b", "c", True), ("", "[NULL]", False), ("no plan at all", "[NULL]", False)]
    assert answers["first"] == [("a", "b </think> c", True), ("", "[NULL]", False),
                                ("no plan at all", "[NULL]", False)]  # strict think mode: an empty plan is none


def test_generate_prints_progress_while_a_batch_decodes_and_says_why_no_answer_is_valid(
        run_copy, prompts_file, tmp_path, monkeypatch, capsys):
    from rlmt_jax.commands import generate

    monkeypatch.setattr(generate, "PROGRESS_STEPS", 2)  # 6 new tokens: up to 3 chunks a batch
    monkeypatch.setattr(*outputs_of([EMPTY_PLAN, "no plan<|eot_id|>", "</think>", "a filler row"]))
    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert main(["generate", "--model", str(run_copy), "--input", str(prompts_file), "--output", str(out),
                 *GENERATE, "--progress-seconds", "0.000001"]) == 0
    err = capsys.readouterr().err.splitlines()
    decoding = [line for line in err if " decoding: " in line]
    assert decoding and decoding[0].startswith("generate: batch 1/2 decoding: 3/6 tokens a row, ")
    assert any(line.startswith("generate: batch 2/2 decoding: ") for line in decoding)
    assert all(" rows done, " in line for line in decoding)
    assert err.index(decoding[0]) < err.index(next(line for line in err if line.startswith("generate: 2/3 prompts")))
    assert any(line.startswith("generate: sampled ") and line.endswith(" tok/s)") for line in err)
    assert err[-1] == (
        "generate: warning: none of the 3 answers has the think format (a plan, then </think>), so every `output` "
        "is [NULL]: the model was never taught that format; use a model taught to plan first (an SFT warm-start "
        "or RLMT-trained run), the zero template for a base model (--mode zero --zero-family llama|qwen), or "
        "--no-strict to keep the whole output as the answer")


def test_sampler_progress_in_chunks_samples_what_one_decode_program_samples():
    import jax
    from flax import nnx

    from models import ModelConfig, build_model
    from rlmt_jax.rollout.sampling import BatchProgress, SamplingConfig

    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    graphdef, params = nnx.split(build_model(config, nnx.Rngs(0)))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    # sampled (greedy rows are compared in the generate tests); chunks of 3 steps (to steps 4, 7, ...) cross the
    # end of the first decode window (step 6)
    settings = SamplingConfig(max_new_tokens=12, temperature=1.0, prompt_buckets=(16,), decode_windows=2, eos_ids=(3,))
    whole = Sampler(graphdef, settings)
    reports = []
    chunked = Sampler(graphdef, settings, progress=reports.append, progress_steps=3)
    expected, got = whole(params, prompts, jax.random.key(1)), chunked(params, prompts, jax.random.key(1))
    for name in ("tokens", "prompt_mask", "response_mask", "logprobs", "response_lengths", "stop_reason"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(expected, name)))
    steps = [r.step for r in reports]
    assert len(steps) > 3 and steps == sorted(steps) and all(b - a <= 3 for a, b in zip([1, *steps], steps))
    lengths = np.asarray(expected.response_lengths)
    assert reports[-1] == BatchProgress(int(lengths.max()), 12, int((lengths < 12).sum()), 3, int(lengths.sum()))
    assert whole.compiled_programs() == 2 and chunked.compiled_programs() == 4  # chunks: no program each


# ------------------------------------------------------------------------------------ lengths and the output path


def stopped_before_sampling(monkeypatch):
    """`generate` stops (KeyboardInterrupt) once its partial file has its settings, before any row is sampled."""
    from rlmt_jax.commands import generate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate._Answers, "write_all", stop)


def partial_settings(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".partial").read_text().splitlines()[0])["generate"]


def test_generate_takes_the_runs_lengths_and_fits_a_models_positions(run_copy, prompts_file, tmp_path, monkeypatch,
                                                                   capsys):
    import models

    stopped_before_sampling(monkeypatch)
    out = tmp_path / "run.json"
    interrupted(["generate", "--model", str(run_copy), "--input", str(prompts_file), "--output", str(out)])
    settings = partial_settings(out)
    assert (settings["max_new_tokens"], settings["max_prompt_tokens"], settings["split"]) == (8, 96, "last")

    hf_dir = tiny.tiny_assets_dir() / "policy"  # no run: 4096 new tokens, less when the model has fewer positions
    assert json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"] == 2048
    out = tmp_path / "hf.json"
    capsys.readouterr()
    interrupted(["generate", "--model", str(hf_dir), "--input", str(prompts_file), "--output", str(out)])
    assert partial_settings(out)["max_new_tokens"] == 1024
    assert ("generate: --max-new-tokens is 1024, not 4096 (the default): the prompt limit 1024 and the answer must "
            "fit the model's max_position_embeddings 2048") in capsys.readouterr().err

    def not_loaded(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "load_pretrained", not_loaded)
    assert main(["generate", "--model", str(hf_dir), "--input", str(prompts_file), "--output", str(out),
                 "--max-new-tokens", "4096"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "rlmt-jax generate: error: --max-new-tokens 4096 and the prompt limit 1024 need 5120 positions, more than "
        "the model's max_position_embeddings 2048: give at most 1024 (or lower --max-prompt-tokens)"]


def test_generate_takes_a_builtin_model_and_fits_its_default_prompt_limit_into_a_short_context(
        prompts_file, tmp_path, monkeypatch, capsys):
    import shutil

    stopped_before_sampling(monkeypatch)
    out = tmp_path / "builtin.json"
    interrupted(["generate", "--model", "builtin:tiny-policy", "--input", str(prompts_file), "--output", str(out)])
    assert (partial_settings(out)["max_prompt_tokens"], partial_settings(out)["max_new_tokens"]) == (1024, 1024)

    short = tmp_path / "short"  # the tiny policy with a 256-token context: the default 1024-token prompt limit halves
    shutil.copytree(tiny.tiny_assets_dir() / "policy", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    out = tmp_path / "short.json"
    capsys.readouterr()
    interrupted(["generate", "--model", str(short), "--input", str(prompts_file), "--output", str(out)])
    assert (partial_settings(out)["max_prompt_tokens"], partial_settings(out)["max_new_tokens"]) == (128, 128)
    assert ("generate: --max-prompt-tokens is 128, not 1024 (the default): the prompt and the answer must fit the "
            "model's max_position_embeddings 256") in capsys.readouterr().err
    assert main(["generate", "--model", str(short), "--input", str(prompts_file), "--output", str(out),
                 "--max-prompt-tokens", "256"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "rlmt-jax generate: error: the prompt limit 256 (--max-prompt-tokens) leaves no room for an answer in the "
        "model's max_position_embeddings 256: lower --max-prompt-tokens"]


def test_generate_refuses_an_output_path_that_cannot_be_a_file_before_loading_anything(prompts_file, tmp_path,
                                                                                       monkeypatch, capsys):
    from rlmt_jax.commands import generate

    def not_loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate, "load_policy", not_loaded)
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("")
    for output, message in [(tmp_path / "a_folder", f"{tmp_path / 'a_folder'} is a folder; give the path of a file "
                                                    "(.json or .jsonl)"),
                            (tmp_path / "a_file" / "sub" / "answers.json", f"{tmp_path / 'a_file'} is a file, not a "
                                                                           "folder")]:
        code = main(["generate", "--model", str(tmp_path / "no_model"), "--input", str(prompts_file), "--output",
                     str(output)])
        assert code == 2 and capsys.readouterr().err.splitlines() == [
            f"rlmt-jax generate: error: --output {output}: {message}"]


# ------------------------------------------------------------------------------------ on two processes

WORKER_TIMEOUT_S = 300


def generate_on_two_processes(runs: list[list[str]]) -> list[dict]:
    """tests/generate_worker.py on two processes of one simulated CPU device each (one cluster), each running
    `generate` with each entry of `runs` in turn.  -> each process's summary, stdout and stderr. A worker that
    fails, or a pair still running after WORKER_TIMEOUT_S (a deadlock), fails the test."""
    workers = start_cluster("generate_worker.py", 2, 1, {"runs": runs})
    outputs = finish_all(workers, WORKER_TIMEOUT_S)
    return [{**last_json_line(outputs[w][0]), "stdout": outputs[w][0], "stderr": outputs[w][1]} for w in workers]


def test_generate_on_two_processes_writes_the_rows_one_process_writes_and_resumes(
        run_copy, prompts_file, generated, tmp_path, monkeypatch):
    # a partial file of the same settings with the first batch done (its rows kept as they are: not sampled again)
    stopped_before_sampling(monkeypatch)
    resumed = tmp_path / "resumed.json"
    command = ["--model", str(run_copy), "--input", str(prompts_file), *GENERATE]
    interrupted(["generate", *command, "--output", str(resumed)])
    partial = resumed.with_name(resumed.name + ".partial")
    kept = [{**generated[0], "output": "kept from the first run"}, generated[1]]
    partial.write_text(partial.read_text() + "".join(json.dumps(row) + "\n" for row in kept))

    whole = tmp_path / "whole.json"
    # --batch-size 2: each process samples 1 prompt a call, 2 calls; in the second process 1 has a filler only
    summaries = generate_on_two_processes([[*command, "--output", str(whole)], [*command, "--output", str(resumed)]])
    assert [(s["process_index"], s["process_count"], s["device_count"], s["codes"]) for s in summaries] == [
        (0, 2, 2, [0, 0]), (1, 2, 2, [0, 0])]
    assert json.loads(whole.read_text()) == generated  # the same rows in the same order
    assert json.loads(resumed.read_text()) == [*kept, generated[2]]
    assert not partial.exists()
    assert summaries[0]["stdout"].count("wrote 3 answers") == 2 and "wrote" not in summaries[1]["stdout"]
    assert "2/3 prompts already done" in summaries[0]["stderr"]
