"""Prompt loading (JSONL, Parquet, saved datasets dir; errors with row numbers) and the grain batch pipeline."""

from __future__ import annotations

import json

import datasets
import pytest

from rlmt_jax.inputs.data import BatchIterator, load_conversations, load_prompts
from rlmt_jax.core.errors import UserError

HELLO = [{"role": "user", "content": "Hello?"}]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
]


def write_jsonl(path, rows, blank_line_after: int | None = None):
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if blank_line_after == i:
                f.write("\n")
    return path


# --- loading ------------------------------------------------------------------------------------------


def test_jsonl_messages_column_loads_as_conversations(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": HELLO}, {"messages": TWO_TURNS}])
    assert load_prompts(path) == [HELLO, TWO_TURNS]


def test_jsonl_prompt_column_becomes_one_user_message(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi there", "id": 1}, {"prompt": "Bye", "id": 2}])
    assert load_prompts(path) == [[{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "Bye"}]]


def test_trailing_assistant_answer_is_dropped_from_a_prompt(tmp_path):
    # Tulu-3-style rows carry the reference answer; the prompt ends at the last user message.
    row = {"messages": HELLO + [{"role": "assistant", "content": "Hi!"}]}
    assert load_prompts(write_jsonl(tmp_path / "p.jsonl", [row])) == [HELLO]


def test_messages_is_preferred_over_prompt_and_a_named_column_wins(tmp_path):
    rows = [{"prompt": "text prompt", "messages": HELLO, "question": "named"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_prompts(path) == [HELLO]
    assert load_prompts(path, column="question") == [[{"role": "user", "content": "named"}]]


def test_parquet_file_loads(tmp_path):
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"messages": HELLO}, {"messages": TWO_TURNS}]).to_parquet(str(path))
    assert load_prompts(path) == [HELLO, TWO_TURNS]


def test_saved_datasets_dir_loads_a_dataset_or_the_train_split(tmp_path):
    data = datasets.Dataset.from_list([{"prompt": "One"}, {"prompt": "Two"}])
    data.save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dict"))
    expected = [[{"role": "user", "content": "One"}], [{"role": "user", "content": "Two"}]]
    assert load_prompts(tmp_path / "plain") == expected
    assert load_prompts(tmp_path / "dict") == expected


def test_the_shipped_tiny_prompt_set_has_200_distinct_single_user_prompts():
    prompts = load_prompts("builtin:tiny-prompts")
    assert len(prompts) == 200
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    texts = [p[0]["content"] for p in prompts]
    assert len(set(texts)) == 200
    assert max(len(t) for t in texts) <= 80
    assert texts[0] == "What is a good name for a small orange cat?"


def test_sft_conversations_must_end_with_the_assistant_answer(tmp_path):
    good = HELLO + [{"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHi!"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": good}])
    assert load_conversations(path) == [good]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": good}, {"messages": HELLO}])
    with pytest.raises(UserError, match=r"row 2 \(line 2\), column 'messages': must end with a non-empty "
                                        r"assistant message"):
        load_conversations(bad)


# --- loading errors -----------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"data file '.*nope.jsonl' does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def test_unknown_suffix_asks_for_a_format(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"cannot tell its format from the name.*set data.format"):
        load_prompts(tmp_path / "p.txt")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"data file '.*empty.jsonl' has no rows"):
        load_prompts(tmp_path / "empty.jsonl")


def test_empty_parquet_says_it_has_no_rows(tmp_path):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": []}, features=datasets.Features({"prompt": datasets.Value("string")})
                               ).to_parquet(str(path))
    with pytest.raises(UserError, match=r"data file '.*empty.parquet' has no rows"):
        load_prompts(path)


def test_missing_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "id": 1}])
    with pytest.raises(UserError, match=r"has none of the columns messages, prompt; columns: text, id"):
        load_prompts(path)
    with pytest.raises(UserError, match=r"has no column 'question' \(data.prompt_column\); columns: text, id"):
        load_prompts(path, column="question")


def test_invalid_json_line_is_named_by_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c"'])
    with pytest.raises(UserError, match=r"data file '.*p.jsonl' line 3: not valid JSON"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"messages": [{"role": "robot", "content": "hi"}]},
         "message 0 has role 'robot'; expected one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": None}]}, "message 0 (user) has no text content"),
        ({"messages": []}, "expected a non-empty list of messages"),
        ({"messages": [{"role": "system", "content": "You are kind."}]}, "has no user message to answer"),
        ({"messages": [{"role": "user", "content": "  "}]}, "the last user message is empty"),
    ],
)
def test_malformed_row_is_named_by_row_and_line_number(tmp_path, bad_row, message):
    # a blank line after row 1 makes row 3 sit on line 4
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": HELLO}, {"messages": TWO_TURNS}, bad_row],
                       blank_line_after=0)
    with pytest.raises(UserError) as err:
        load_prompts(path)
    assert f"p.jsonl' row 3 (line 4), column 'messages': {message}" in str(err.value)


def test_row_of_the_wrong_type_that_arrow_cannot_load_is_named_by_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "fine too"}, {"prompt": 5}])
    with pytest.raises(UserError, match=r"p.jsonl' row 3 \(line 3\), column 'prompt': expected prompt text or a "
                                        r"list of \{role, content\} messages, got 5"):
        load_prompts(path)


def test_row_without_the_column_is_named_by_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"other": "no prompt here"}])
    with pytest.raises(UserError, match=r"p.jsonl' row 2 \(line 2\), column 'prompt': "
                                        r"is empty \(null or missing\)"):
        load_prompts(path)


def test_line_that_is_not_a_json_object_is_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, "[1, 2]"])
    with pytest.raises(UserError, match=r"p.jsonl' line 2: expected a JSON object, got list"):
        load_prompts(path)


def test_a_column_may_mix_prompt_text_and_message_lists(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "text"}, {"q": HELLO}])
    assert load_prompts(path, column="q") == [[{"role": "user", "content": "text"}], HELLO]


def test_empty_prompt_text_in_parquet_is_named_by_row(tmp_path):
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": ""}]).to_parquet(str(path))
    with pytest.raises(UserError, match=r"p.parquet' row 2, column 'prompt': the prompt text is empty"):
        load_prompts(path)


def test_datasets_dir_with_several_splits_and_no_train_asks_which(tmp_path):
    data = datasets.Dataset.from_list([{"prompt": "One"}])
    datasets.DatasetDict({"a": data, "b": data}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserError, match=r"holds splits a, b"):
        load_prompts(tmp_path / "dict")


# --- the grain pipeline -------------------------------------------------------------------------------

ROWS = [f"row{i}" for i in range(22)]


def all_batches(iterator):
    return [(b.step, b.epoch, b.indices) for b in iterator]


def test_batches_cover_each_epoch_once_dropping_the_partial_batch():
    it = BatchIterator(ROWS, 4, seed=3, epochs=3, shard_index=0, shard_count=1)
    assert (it.steps_per_epoch, it.num_steps, it.local_batch_size) == (5, 15, 4)  # 22 // 4 = 5, 2 dropped
    batches = list(it)
    assert [b.step for b in batches] == list(range(15))
    assert [b.epoch for b in batches] == [0] * 5 + [1] * 5 + [2] * 5
    for epoch in range(3):
        rows = [i for b in batches[5 * epoch:5 * epoch + 5] for i in b.indices]
        assert len(rows) == 20 and len(set(rows)) == 20 and set(rows) <= set(range(22))
    assert batches[0].items == tuple(ROWS[i] for i in batches[0].indices)
    orders = [[i for b in batches[5 * e:5 * e + 5] for i in b.indices] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


def test_same_seed_same_order_other_seed_other_order():
    first = all_batches(BatchIterator(ROWS, 4, seed=3, epochs=2, shard_index=0, shard_count=1))
    again = all_batches(BatchIterator(ROWS, 4, seed=3, epochs=2, shard_index=0, shard_count=1))
    other = all_batches(BatchIterator(ROWS, 4, seed=4, epochs=2, shard_index=0, shard_count=1))
    assert first == again
    assert first != other


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_are_disjoint_contiguous_slices_of_the_single_host_batch(hosts):
    single = list(BatchIterator(ROWS, 8, seed=1, epochs=2, shard_index=0, shard_count=1))
    shards = [list(BatchIterator(ROWS, 8, seed=1, epochs=2, shard_index=h, shard_count=hosts))
              for h in range(hosts)]
    for step, whole in enumerate(single):
        parts = [shard[step].indices for shard in shards]
        assert all(len(p) == 8 // hosts for p in parts)
        assert sum(parts, ()) == whole.indices  # host h holds rows [h*L, (h+1)*L) of the global batch
        assert len(set(sum(parts, ()))) == 8  # disjoint
    assert all(len(shard) == len(single) == 4 for shard in shards)


def test_resume_from_saved_state_continues_with_the_identical_batches():
    uninterrupted = all_batches(BatchIterator(ROWS, 4, seed=5, epochs=3, shard_index=0, shard_count=1))
    first = BatchIterator(ROWS, 4, seed=5, epochs=3, shard_index=0, shard_count=1)
    seen = [next(first) for _ in range(7)]  # into the second epoch
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    assert state["next_step"] == 7
    resumed = BatchIterator(ROWS, 4, seed=5, epochs=3, shard_index=0, shard_count=1)
    resumed.set_state(state)
    assert all_batches(seen) + all_batches(resumed) == uninterrupted


def test_resume_on_another_host_count_gives_the_same_global_batches():
    whole = list(BatchIterator(ROWS, 4, seed=5, epochs=2, shard_index=0, shard_count=1))
    one_host = BatchIterator(ROWS, 4, seed=5, epochs=2, shard_index=0, shard_count=1)
    for _ in range(3):
        next(one_host)
    state = one_host.get_state()
    hosts = [BatchIterator(ROWS, 4, seed=5, epochs=2, shard_index=h, shard_count=2) for h in range(2)]
    for host in hosts:
        host.set_state(state)
    rest = [list(host) for host in hosts]
    assert [a.indices + b.indices for a, b in zip(*rest)] == [b.indices for b in whole[3:]]


def test_state_from_other_data_or_settings_is_refused():
    state = BatchIterator(ROWS, 4, seed=5, epochs=2, shard_index=0, shard_count=1).get_state()
    with pytest.raises(UserError, match=r"has num_records=22 but this run has 21: the data or its settings"):
        BatchIterator(ROWS[:21], 4, seed=5, epochs=2, shard_index=0, shard_count=1).set_state(state)
    with pytest.raises(UserError, match=r"has seed=5 but this run has 6"):
        BatchIterator(ROWS, 4, seed=6, epochs=2, shard_index=0, shard_count=1).set_state(state)


def test_no_epoch_limit_repeats_with_a_fresh_order():
    it = BatchIterator(ROWS[:8], 4, seed=0, epochs=None, shard_index=0, shard_count=1)
    batches = [next(it) for _ in range(10)]
    assert it.num_steps is None
    assert [b.epoch for b in batches] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(sorted(batches[i].indices + batches[i + 1].indices) == list(range(8)) for i in range(0, 10, 2))


def test_batch_size_must_split_over_hosts_and_fit_the_data():
    with pytest.raises(UserError, match=r"batch size 6 \(prompts per step\) must be divisible by the number of "
                                        r"hosts \(4\)"):
        BatchIterator(ROWS, 6, seed=0, shard_index=0, shard_count=4)
    with pytest.raises(UserError, match=r"the data has 22 rows, fewer than one batch of 32"):
        BatchIterator(ROWS, 32, seed=0, shard_index=0, shard_count=1)


def test_default_shard_is_this_jax_process():
    it = BatchIterator(ROWS, 4, seed=0)
    assert (it.shard_index, it.shard_count) == (0, 1)


# --- from a run config --------------------------------------------------------------------------------


def test_tiny_default_gives_25_steps_an_epoch_of_8_prompts_for_2_epochs():
    from rlmt_jax.settings.config import resolve
    from rlmt_jax.inputs.data import load_train_records, train_batches

    cfg = resolve(None)
    records = load_train_records(cfg)
    batches = train_batches(cfg, records, shard_index=0, shard_count=1)
    assert (len(records), batches.steps_per_epoch, batches.num_steps, batches.local_batch_size) == (200, 25, 50, 8)
    first = next(batches)
    assert first.items == tuple(records[i] for i in first.indices)


def test_sft_batches_use_the_sft_batch_size_and_epochs(tmp_path):
    from rlmt_jax.settings.config import from_dict
    from rlmt_jax.inputs.data import load_train_records, train_batches

    answer = [{"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": HELLO + answer}] * 10)
    cfg = from_dict({"model": {"policy": "p"}, "data": {"train_path": str(path)},
                     "algorithm": {"name": "sft", "sft": {"batch_size": 4, "epochs": 3}},
                     "optimizer": {"micro_batch_size": 2}})
    batches = train_batches(cfg, load_train_records(cfg), shard_index=0, shard_count=1)
    assert (batches.steps_per_epoch, batches.num_steps, batches.local_batch_size) == (2, 6, 4)
    assert next(batches).items[0] == HELLO + answer


# --- errors a user meets first ---------------------------------------------------------------------------


def test_a_line_that_is_not_utf8_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"data file '{path}' line 3: is not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_prompts(path)


def test_a_data_error_found_after_the_checkpoint_store_opens_ends_in_one_line(tmp_path, tiny_cache):
    # Too few rows for one batch is found once the run dir and its checkpoint store exist: orbax's cleanup
    # thread, still running as the interpreter ended, printed a 42-line traceback after the error.
    import os
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    env = {**os.environ, "RLMT_JAX_CACHE": str(tiny_cache)}
    result = subprocess.run([sys.executable, "-m", "rlmt_jax.cli", "train", f"data.train_path={path}",
                             f"run.output_dir={tmp_path / 'run'}", "logging.tensorboard=false"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING:rlmt_jax.trainer.loop:removed")]
    assert lines == ["rlmt-jax train: error: the data has 2 rows, fewer than one batch of 8"]


# --- prompts over data.max_prompt_tokens ---------------------------------------------------------------


PROMPTS = [[{"role": "user", "content": c}] for c in ("a", "bb", "ccc", "dddd")]


def test_overlong_prompts_are_kept_dropped_or_an_error_and_counted_once(caplog):
    from rlmt_jax.inputs.data import fit_prompt_limit

    lengths = [5, 12, 8, 30]
    with caplog.at_level("WARNING", logger="rlmt_jax.inputs.data"):
        assert fit_prompt_limit(PROMPTS, lengths, 10, "truncate_left", "p.jsonl") == PROMPTS
        assert fit_prompt_limit(PROMPTS, lengths, 10, "drop", "p.jsonl") == [PROMPTS[0], PROMPTS[2]]
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 4 prompts of p.jsonl are longer than data.max_prompt_tokens=10: they lose their first tokens, the "
        "BOS and chat header among them (data.overlong=truncate_left; drop or error are the alternatives)",
        "2 of 4 prompts of p.jsonl are longer than data.max_prompt_tokens=10: dropped (data.overlong=drop)"]
    with pytest.raises(UserError, match=r"2 of 4 prompts .* \(the first: row 2, 12 tokens\) and data.overlong=error"):
        fit_prompt_limit(PROMPTS, lengths, 10, "error", "p.jsonl")
    with pytest.raises(UserError, match="data.overlong=drop leaves no prompt"):
        fit_prompt_limit(PROMPTS, lengths, 4, "drop", "p.jsonl")
    caplog.clear()
    assert fit_prompt_limit(PROMPTS, lengths, 30, "error", "p.jsonl") == PROMPTS and not caplog.records


def test_the_trainer_drops_the_prompts_whose_rendered_tokens_pass_the_limit(tmp_path, tiny_cache):
    from rlmt_jax.settings.config import resolve
    from rlmt_jax.inputs.data import load_prompts
    from rlmt_jax.inputs.templates import encode_prompt
    from rlmt_jax.trainer.loop import Trainer

    overrides = ["data.max_prompt_tokens=70", f"run.output_dir={tmp_path / 'run'}", "rollout.prompt_buckets=[]",
                 "logging.tensorboard=false"]
    trainer = Trainer(resolve(None, [*overrides, "data.overlong=drop"]))
    everything = load_prompts("builtin:tiny-prompts")
    lengths = [len(encode_prompt(trainer.text.tokenizer, p, 10**6).ids) for p in everything]
    assert 0 < sum(n > 70 for n in lengths) < len(everything)
    assert trainer.records == [p for p, n in zip(everything, lengths) if n <= 70]
    trainer.store.close()
    with pytest.raises(UserError, match=r"prompts of builtin:tiny-prompts are longer than data.max_prompt_tokens=70 "
                                        r"\(the first: row \d+, \d+ tokens\) and data.overlong=error"):
        Trainer(resolve(None, [*overrides, "data.overlong=error", f"run.output_dir={tmp_path / 'run_error'}"]))
