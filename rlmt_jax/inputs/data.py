"""Prompts and conversations from files, and the grain pipeline that batches them for training.

Loading (`load_prompts`, `load_conversations`): JSONL, Parquet or a saved `datasets` directory, read with
`datasets`, with a column `messages` (a list of `{role, content}`) or `prompt` (text). Every row is checked;
a bad one is a UserError with its row number (and line number for JSONL).

Batching (`BatchIterator`): a grain pipeline over row indices:
    shuffle(seed), re-seeded every epoch  ->  batches of the GLOBAL batch size, last partial batch of each
    epoch dropped  ->  repeat for the epochs  ->  each host keeps its contiguous slice of every batch.
The global order does not depend on the number of hosts, so the iterator state (the next batch index)
resumes a run exactly, even on a different host count.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grain

from rlmt_jax.algorithms.specs import spec_of
from rlmt_jax.settings.config import BUILTIN_DATA, BUILTIN_PREFIX, RunConfig
from rlmt_jax.core.errors import UserError
from rlmt_jax.core.jsonl import decode_line, read_jsonl_objects

log = logging.getLogger("rlmt_jax.inputs.data")
Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant")
DEFAULT_COLUMNS = ("messages", "prompt")
FORMATS = ("jsonl", "parquet", "datasets")


# ---------------------------------------------------------------------------------------------------------
# Reading rows with `datasets`.


def resolve_data_path(path: str) -> Path:
    """The file behind `path`; `builtin:tiny-prompts` is the prompt set shipped in rlmt_jax/resources."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_DATA:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATA)
            raise UserError(f"data file '{path}' is not a built-in data set (built-ins: {known})")
        return Path(str(resources.files("rlmt_jax") / "resources" / BUILTIN_DATA[name]))
    return Path(path)


def detect_format(path: Path, format: str = "auto") -> str:
    """'jsonl', 'parquet' or 'datasets' (a directory written by `Dataset.save_to_disk`)."""
    if format != "auto":
        if format not in FORMATS:
            raise UserError(f"data format '{format}' is not one of auto, {', '.join(FORMATS)}")
        return format
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UserError(f"data file '{path}': cannot tell its format from the name; use .jsonl, .parquet, "
                    "a saved datasets directory, or set data.format")


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bars or error logs inside (we raise our own errors); restored after."""
    import logging

    import datasets

    were_disabled = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not were_disabled:
            datasets.enable_progress_bars()


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based line numbers of the non-blank lines: row i of the data set is on line numbers[i]."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _has_a_line(path: Path) -> bool:
    """Whether the file has a non-blank line; a UserError names the first line that is not UTF-8 text (Arrow
    would read it and fail later, on the value, without saying where)."""
    found = False
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            decode_line(line, f"data file '{path}'", number)
            found = found or bool(line.strip())
    return found


def _parse_jsonl(path: Path) -> list[dict]:
    """Every non-blank line as a JSON object; a UserError names the first line that is not one."""
    return [row for _, row in read_jsonl_objects(path, "data file")]


@dataclass(frozen=True)
class Table:
    """Rows read from a file: the column names and a way to get one column's values."""

    columns: list[str]
    num_rows: int
    column: Callable[[str], Sequence[Any]]

    @classmethod
    def from_dataset(cls, dataset: Any) -> Table:
        return cls(list(dataset.column_names), len(dataset), lambda name: dataset[name])

    @classmethod
    def from_dicts(cls, rows: list[dict]) -> Table:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return cls(columns, len(rows), lambda name: [row.get(name) for row in rows])


def read_rows(path: Path, format: str) -> Table:
    """The rows, read with `datasets` (one split of a saved DatasetDict: 'train', or the only one).

    A JSONL file Arrow cannot type (a column of mixed types, a bad line) is parsed line by line instead,
    so that the bad row is found and named rather than reported as an Arrow error.
    """
    import datasets

    if not path.exists():
        raise UserError(f"data file '{path}' does not exist")
    with _quiet_datasets():
        if format == "datasets":
            try:
                loaded = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as err:
                raise UserError(f"data dir '{path}' is not a saved datasets directory: {err}") from None
            if isinstance(loaded, datasets.DatasetDict):
                if "train" in loaded:
                    return Table.from_dataset(loaded["train"])
                if len(loaded) == 1:
                    return Table.from_dataset(next(iter(loaded.values())))
                raise UserError(f"data dir '{path}' holds splits {', '.join(loaded)}: save the one to train "
                                "on, or name it 'train'")
            return Table.from_dataset(loaded)
        if format == "jsonl" and not _has_a_line(path):
            raise UserError(f"data file '{path}' has no rows")
        builder = "json" if format == "jsonl" else "parquet"
        try:
            return Table.from_dataset(datasets.load_dataset(builder, data_files=str(path), split="train"))
        except Exception as err:
            if "corresponds to no data" in str(err):  # an empty split: no rows at all
                raise UserError(f"data file '{path}' has no rows") from None
            if format == "jsonl":
                return Table.from_dicts(_parse_jsonl(path))
            raise UserError(f"data file '{path}' cannot be read as {format}: {str(err) or type(err).__name__}"
                            ) from None


# ---------------------------------------------------------------------------------------------------------
# Checking and normalising rows.


class _RowError(Exception):
    """A malformed row: the caller adds the file and row number."""


def _messages_from(value: Any) -> Conversation:
    if not isinstance(value, (list, tuple)) or not value:
        raise _RowError(f"expected a non-empty list of messages, got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RowError(f"message {i} is not a {{role, content}} object: {_describe(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _RowError(f"message {i} ({role}) has no text content: {_describe(content)}")
        messages.append({"role": role, "content": content})
    return messages


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prompt_from_row(value: Any) -> Conversation:
    """A conversation that ends with a user message, from a `messages` list or a `prompt` text.

    Trailing assistant turns (the reference answer of SFT-style data such as Tulu 3) are dropped: the
    prompt is the conversation up to and including its last user message.
    """
    if isinstance(value, str):
        if not value.strip():
            raise _RowError("the prompt text is empty")
        return [{"role": "user", "content": value}]
    if value is None:
        raise _RowError("is empty (null or missing)")
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"expected prompt text or a list of {{role, content}} messages, got {_describe(value)}")
    messages = _messages_from(value)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise _RowError("has no user message to answer")
    if not messages[-1]["content"].strip():
        raise _RowError("the last user message is empty")
    return messages


def conversation_from_row(value: Any) -> Conversation:
    """A conversation for SFT: at least one user message, ending with a non-empty assistant message."""
    if isinstance(value, str):
        raise _RowError("is text; SFT needs a list of messages ending with the assistant's answer")
    messages = _messages_from(value)
    if not any(m["role"] == "user" for m in messages):
        raise _RowError("has no user message")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise _RowError("must end with a non-empty assistant message (the answer to train on)")
    return messages


def _pick_column(path: Path, columns: Sequence[str], column: str | None, candidates: Sequence[str]) -> str:
    if column is not None:
        if column not in columns:
            raise UserError(f"data file '{path}' has no column '{column}' (data.prompt_column); "
                            f"columns: {', '.join(columns)}")
        return column
    for name in candidates:
        if name in columns:
            return name
    raise UserError(f"data file '{path}' has none of the columns {', '.join(candidates)}; columns: "
                    f"{', '.join(columns)} (set data.prompt_column to use another)")


def _load(path: str | os.PathLike, format: str, column: str | None, candidates: Sequence[str],
          from_row: Callable[[Any], Conversation]) -> list[Conversation]:
    file = resolve_data_path(os.fspath(path))
    if not file.exists():
        raise UserError(f"data file '{file}' does not exist (data.train_path)")
    fmt = detect_format(file, format)
    rows = read_rows(file, fmt)
    if rows.num_rows == 0:
        raise UserError(f"data file '{file}' has no rows")
    name = _pick_column(file, rows.columns, column, candidates)
    out = []
    for index, value in enumerate(rows.column(name)):
        try:
            out.append(from_row(value))
        except _RowError as err:
            where = f"row {index + 1}"
            if fmt == "jsonl":
                where += f" (line {_jsonl_line_numbers(file)[index]})"
            raise UserError(f"data file '{file}' {where}, column '{name}': {err}") from None
    return out


def load_prompts(path: str | os.PathLike, format: str = "auto", column: str | None = None) -> list[Conversation]:
    """Every row as a conversation ending with a user message; column None: `messages`, else `prompt`."""
    return _load(path, format, column, DEFAULT_COLUMNS, prompt_from_row)


def load_conversations(path: str | os.PathLike, format: str = "auto",
                       column: str | None = None) -> list[Conversation]:
    """Every row as a conversation ending with the assistant's answer (SFT data); column default `messages`."""
    return _load(path, format, column, ("messages",), conversation_from_row)


# ---------------------------------------------------------------------------------------------------------
# The grain pipeline.


@dataclass(frozen=True)
class Batch:
    """One host's part of one global batch."""

    step: int  # index of the global batch, from 0
    epoch: int
    indices: tuple[int, ...]  # row numbers (0-based) in the loaded data
    items: tuple[Any, ...]  # the records at those rows (conversations)


def _host_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    return shard_index, shard_count


class BatchIterator:
    """Seeded, epoch-wise shuffled batches of `records`, this host's slice of each; resumable.

    `global_batch_size` counts over all hosts (rollout.prompts_per_step); each of the `shard_count` hosts
    gets `global_batch_size // shard_count` records per batch. `epochs=None` repeats forever.
    `get_state()` is a small JSON-able dict; `set_state(state)` continues with the identical sequence.
    """

    def __init__(self, records: Sequence[Any], global_batch_size: int, *, seed: int, epochs: int | None = 1,
                 shard_index: int | None = None, shard_count: int | None = None):
        self.records = records
        self.num_records = len(records)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epochs = epochs
        self.shard_index, self.shard_count = _host_shard(shard_index, shard_count)
        if global_batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {global_batch_size}")
        if global_batch_size % self.shard_count:
            raise UserError(f"the batch size {global_batch_size} (prompts per step) must be divisible by the "
                            f"number of hosts ({self.shard_count})")
        if self.num_records < global_batch_size:
            raise UserError(f"the data has {self.num_records} rows, fewer than one batch of {global_batch_size}")
        if epochs is not None and epochs < 1:
            raise UserError(f"epochs must be >= 1 or None, got {epochs}")
        self.local_batch_size = global_batch_size // self.shard_count
        self.steps_per_epoch = self.num_records // global_batch_size
        self.num_steps = None if epochs is None else self.steps_per_epoch * epochs

        start = self.shard_index * self.local_batch_size
        stop = start + self.local_batch_size
        dataset = (
            grain.MapDataset.range(self.num_records)
            .shuffle(seed=seed)
            .batch(global_batch_size, drop_remainder=True, batch_fn=tuple)
            .repeat(epochs)  # re-seeds the shuffle every epoch
            .map(lambda rows: rows[start:stop])
        )
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = iter(dataset.to_iter_dataset(read_options=options))
        self._next_step = 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        indices = tuple(int(i) for i in next(self._iterator))
        step = self._next_step
        self._next_step += 1
        return Batch(step=step, epoch=step // self.steps_per_epoch, indices=indices,
                     items=tuple(self.records[i] for i in indices))

    @property
    def exhausted(self) -> bool:
        """Every batch of the epochs has been taken (never with epochs=None)."""
        return self.num_steps is not None and self._next_step >= self.num_steps

    def _identity(self) -> dict[str, Any]:
        return {"num_records": self.num_records, "global_batch_size": self.global_batch_size,
                "seed": self.seed, "epochs": self.epochs}

    def get_state(self) -> dict[str, Any]:
        """{'next_step': k, 'grain': grain's iterator state, and what the order depends on}."""
        return {"next_step": self._next_step, "grain": self._iterator.get_state(), **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` dict; the data, batch size, seed and epochs must be the same."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(f"the saved data iterator state has {key}={state.get(key)!r} but this run has "
                                f"{value!r}: the data or its settings changed since the checkpoint")
        self._iterator.set_state(state["grain"])
        self._next_step = int(state["next_step"])


# ---------------------------------------------------------------------------------------------------------
# From a run config.


def prompt_lengths(tokenizer, prompts: Sequence[Conversation]) -> list[int]:
    """Tokens of each prompt rendered with the policy's chat template (as the sampler gets it, uncut)."""
    from rlmt_jax.inputs.templates import render_prompt

    texts = [render_prompt(tokenizer, messages) for messages in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def fit_prompt_limit(prompts: Sequence[Conversation], lengths: Sequence[int], limit: int, overlong: str,
                     source: str) -> list[Conversation]:
    """The prompts to train on, by data.overlong for those longer than `limit` tokens: all of them, cut from
    the left when sampled (truncate_left), those that fit (drop), or a UserError naming the first row (error).
    Says once how many prompts are over the limit."""
    over = [i for i, n in enumerate(lengths) if n > limit]
    if not over:
        return list(prompts)
    what = f"{len(over)} of {len(prompts)} prompts of {source} are longer than data.max_prompt_tokens={limit}"
    if overlong == "error":
        first = over[0]
        raise UserError(f"{what} (the first: row {first + 1}, {lengths[first]} tokens) and data.overlong=error: "
                        "raise the limit, or set data.overlong to truncate_left or drop")
    if overlong == "drop":
        if len(over) == len(prompts):
            raise UserError(f"{what}: data.overlong=drop leaves no prompt")
        log.warning("%s: dropped (data.overlong=drop)", what)
        skipped = set(over)
        return [p for i, p in enumerate(prompts) if i not in skipped]
    log.warning("%s: they lose their first tokens, the BOS and chat header among them "
                "(data.overlong=truncate_left; drop or error are the alternatives)", what)
    return list(prompts)


def load_train_records(cfg: RunConfig) -> list[Conversation]:
    """The run's data, of the kind its algorithm's spec names: conversations (SFT) or prompts."""
    load = load_conversations if spec_of(cfg).data == "conversations" else load_prompts
    return load(cfg.data.train_path, format=cfg.data.format, column=cfg.data.prompt_column)


def train_batches(cfg: RunConfig, records: Sequence[Any], shard_index: int | None = None,
                  shard_count: int | None = None) -> BatchIterator:
    """The run's batches, of the size and epochs its algorithm's spec names (rollout.prompts_per_step
    prompts for data.epochs; SFT: algorithm.sft.batch_size conversations for algorithm.sft.epochs),
    shuffled with data.shuffle_seed, this host's slice."""
    batch_size, epochs = spec_of(cfg).data_batches(cfg)
    return BatchIterator(records, batch_size, seed=cfg.data.shuffle_seed, epochs=epochs,
                         shard_index=shard_index, shard_count=shard_count)
