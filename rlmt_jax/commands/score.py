"""`rlmt-jax score`: score policy outputs with a reward model, as the training loop does.

Reads JSON lines or a JSON list (such as `rlmt-jax generate`'s .json or .jsonl output) with the prompt as
`messages`, `prompt` or `instruction`, and the policy's raw text (plan included) as `raw_output` (what generate
writes) or else `output`; splits the answer from each output, scores it with the reward model's own tokenizer
and chat template, and writes each row back with `answer` (what the RM saw), `format_valid` and `reward`
(a JSON list when the output path ends in .json, JSON lines otherwise). The output file appears only when
complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlmt_jax.core.errors import UserError
from rlmt_jax.core.jsonl import read_records, write_records_atomic
from rlmt_jax.inputs.templates import ANSWER_MODES, KNOWN_EOS_TEXTS, TemplateSettings, eos_texts_of, messages_from_row


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score policy outputs (JSONL or JSON list, e.g. generate's) with a reward model",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--reward-model", required=True,
                        help="Hugging Face reward-model directory (or builtin:tiny-reward, the tiny default's)")
    parser.add_argument("--input", required=True,
                        help="JSONL or JSON list: `messages`, `prompt` or `instruction`; `raw_output` or `output`")
    parser.add_argument("--output", required=True,
                        help="file to write (.json: a list of records, else JSONL), rows with `answer` and `reward`")
    parser.add_argument(
        "--mode", choices=ANSWER_MODES, default="think", help="how the answer is split (default think)"
    )
    parser.add_argument("--strict", action="store_true", help="a missing delimiter gives the answer [NULL]")
    parser.add_argument(
        "--policy-tokenizer",
        help="the policy's tokenizer directory, or its run dir (or builtin:tiny-policy): its EOS text is removed, "
        "lengths are counted in its tokens",
    )
    parser.add_argument(
        "--eos-text",
        action="append",
        help="policy EOS text to remove (repeatable; default: the policy tokenizer's, else "
        + " ".join(KNOWN_EOS_TEXTS) + ")",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per reward-model call (default 8)")
    parser.add_argument(
        "--max-length", type=int, default=8192, help="reward-model input limit in tokens (default 8192)"
    )
    parser.add_argument("--truncation-side", choices=("right", "left"), default="right")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--label", help="the label that is the reward, by name (config.json id2label) or index, "
                        "for a reward model with more than one (as reward.label in training)")
    parser.set_defaults(func=run)


def raw_text(row: dict) -> str | None:
    """The policy's whole output: `raw_output` (generate's rows, whose `output` is the answer alone) or `output`."""
    return row.get("raw_output", row.get("output"))


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(row number, row) of every row; each row has a prompt and a string `raw_output` or `output`."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    for number, row in read_records(path):
        column = "raw_output" if "raw_output" in row else "output"
        if column not in row:
            raise UserError(f"{path} row {number}: has no `output`")
        if not isinstance(row[column], str):
            raise UserError(f"{path} row {number}: `{column}` must be text")
        messages_from_row(row, f"{path} row {number}")
        rows.append((number, row))
    if not rows:
        raise UserError(f"{path}: is empty, there are no rows to score")
    return rows


def policy_tokenizer_dir(path: str) -> str:
    """A tokenizer directory, a builtin: model, or a run dir: the tokenizer it trained with (RUN_DIR/policy)."""
    from rlmt_jax.inputs.tiny import resolve_model_path
    from rlmt_jax.settings.config import load_resolved
    from rlmt_jax.run.run_dir import policy_files

    if (Path(path) / "config.yaml").is_file():
        return policy_files(Path(path), load_resolved(path))[1]
    return resolve_model_path(path)


def run(args: argparse.Namespace) -> int:
    from rlmt_jax.inputs.tiny import resolve_model_path
    from rlmt_jax.rollout.rewards import RewardScorer, RewardSettings

    input_path, output_path = Path(args.input), Path(args.output)
    rows = read_rows(input_path)
    template = TemplateSettings(mode=args.mode, strict=args.strict)
    settings = RewardSettings(
        max_length=args.max_length, truncation_side=args.truncation_side, batch_size=args.batch_size, dtype=args.dtype,
        label=args.label,
    )
    policy_tokenizer = None
    if args.policy_tokenizer:
        from transformers import AutoTokenizer

        try:
            policy_tokenizer = AutoTokenizer.from_pretrained(policy_tokenizer_dir(args.policy_tokenizer),
                                                             trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"--policy-tokenizer {args.policy_tokenizer}: cannot load it ({err})") from err
    if args.eos_text:
        eos_texts = tuple(args.eos_text)
    elif policy_tokenizer is not None:
        eos_texts = eos_texts_of(policy_tokenizer)
    else:
        eos_texts = KNOWN_EOS_TEXTS

    scorer = RewardScorer.from_pretrained(resolve_model_path(args.reward_model), settings)
    prompts = [messages_from_row(row, f"{input_path} row {n}") for n, row in rows]
    batch = scorer.score_outputs(
        prompts, [raw_text(row) for _, row in rows], template, eos_texts, length_tokenizer=policy_tokenizer
    )
    scored = [
        {**row, "answer": answer, "format_valid": bool(valid), "reward": float(reward)}
        for (_, row), answer, valid, reward in zip(rows, batch.answers, batch.valid, batch.rewards)
    ]
    write_records_atomic(output_path, scored)
    print(json.dumps({"rows": len(scored), **batch.metrics, "output": str(output_path)}))
    return 0
