"""`rlmt-jax generate`: answers for evaluation prompts with the jitted sampler, in AlpacaEval's format.

Reads JSONL rows with `messages`, `prompt` or `instruction` (AlpacaEval's field); renders each with the model's
chat template (or the zero template), samples, splits the plan from the answer, and writes one row per prompt
with `instruction`, `output` (the answer, plan removed), `generator`, and `raw_output` / `plan` (the full text).
The output file appears only when complete.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rlmt_jax.errors import UserError
from rlmt_jax.jsonl import read_jsonl_objects
from rlmt_jax.templates import ANSWER_MODES, TemplateSettings, messages_from_row


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate answers for evaluation prompts (AlpacaEval JSONL)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--model", required=True, help="Hugging Face model directory (e.g. a run's export/)")
    parser.add_argument("--input", required=True, help="JSONL with `messages`, `prompt` or `instruction`")
    parser.add_argument("--output", required=True, help="JSONL to write")
    parser.add_argument("--mode", choices=ANSWER_MODES, default="think", help="how the answer is split")
    parser.add_argument("--strict", action="store_true", help="a missing delimiter gives the answer [NULL]")
    parser.add_argument("--zero-family", choices=("llama", "qwen"), default=None,
                        help="render with the paper's zero template for base models of this family")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--generator", default=None, help="the `generator` name (default: the model dir name)")
    parser.set_defaults(func=run)


def read_prompts(path: Path) -> list[tuple[int, list[dict]]]:
    """(line number, prompt messages) for each non-blank line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    for number, row in read_jsonl_objects(path):
        if row.get("messages") is None and row.get("prompt") is None and isinstance(row.get("instruction"), str):
            row = {"prompt": row["instruction"]}
        rows.append((number, messages_from_row(row, f"{path} row {number}")))
    if not rows:
        raise UserError(f"{path}: is empty, there are no prompts")
    return rows


def run(args: argparse.Namespace) -> int:
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    import models
    from rlmt_jax.jsonl import write_jsonl_atomic
    from rlmt_jax.rollouts import PolicyText
    from rlmt_jax.sampling import Sampler, SamplingConfig, default_prompt_buckets
    from rlmt_jax.templates import ZERO_EOS_BY_FAMILY, split_output

    rows = read_prompts(Path(args.input))
    try:
        model = models.load_pretrained(args.model, dtype=args.dtype, param_dtype=args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {args.model}: {err}") from err
    if not isinstance(model, models.CausalLM):
        raise UserError(f"--model {args.model}: is not a *ForCausalLM checkpoint")
    settings = TemplateSettings(
        mode=args.mode, strict=args.strict, max_prompt_tokens=args.max_prompt_tokens,
        prompt_template="zero" if args.zero_family else "chat", thinking=args.mode != "none",
        zero_eos_token=ZERO_EOS_BY_FAMILY[args.zero_family] if args.zero_family else None,
    )
    text = PolicyText.create(tokenizer, settings, model.config.eos_token_id)
    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, SamplingConfig(
        n=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        eos_ids=text.stop_ids, pad_id=text.pad_id, prompt_buckets=default_prompt_buckets(args.max_prompt_tokens),
    ))
    generator = args.generator or os.path.basename(os.path.normpath(args.model))
    key = jax.random.key(args.seed)
    out = []
    for start in range(0, len(rows), args.batch_size):
        chunk = [messages for _, messages in rows[start:start + args.batch_size]]
        prompt_ids, _ = text.encode(chunk)
        key, sample_key = jax.random.split(key)
        rollout = sampler(params, prompt_ids, sample_key)
        for messages, raw in zip(chunk, text.decode_responses(rollout)):
            split = split_output(raw, settings, text.eos_texts)
            out.append({"instruction": messages[-1]["content"], "output": split.answer, "generator": generator,
                        "raw_output": raw, "plan": split.plan, "format_valid": split.valid})
    write_jsonl_atomic(args.output, out)
    print(f"wrote {len(out)} answers to {args.output}")
    return 0
