"""`rlmt-jax generate`: answers for evaluation prompts with the jitted sampler, ready for AlpacaEval 2.

--model is a run dir (its newest checkpoint, or --step; its export/ when it has no checkpoint), a run's
export/, or any Hugging Face directory. Prompts come as JSON lines or a JSON list (AlpacaEval's eval set) with
`messages`, `prompt` or `instruction`. Each is rendered with the policy's chat template (or the zero template),
sampled on the device mesh, and its plan split from the answer, with the run's template settings (mode,
strict) unless flags say otherwise. Every input field is kept; each row gets `instruction`, `output` (the
answer, plan removed), `generator` (the run's name), `raw_output`, `plan` and `format_valid`. An output path
ending in .json gets a JSON list of records (what AlpacaEval reads), any other JSON lines.

Rows are appended to OUTPUT.partial as they are done, so a rerun with the same output and settings goes on
after the last done row. The output file appears only when complete; the partial file is then removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from rlmt_jax.core.errors import UserError
from rlmt_jax.core.jsonl import read_records
from rlmt_jax.inputs.templates import ANSWER_MODES, messages_from_row

PARTIAL_SUFFIX = ".partial"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate answers for evaluation prompts (AlpacaEval .json or JSONL)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--model", required=True,
                        help="a run dir, a run's export/, or a Hugging Face model directory")
    parser.add_argument("--step", type=int, default=None, help="with a run dir: the checkpoint step (default newest)")
    parser.add_argument("--input", required=True, help="JSONL or JSON list with `messages`, `prompt` or `instruction`")
    parser.add_argument("--output", required=True, help="file to write: .json (a list of records) or JSONL")
    parser.add_argument("--mode", choices=ANSWER_MODES, default=None,
                        help="how the answer is split (default: the run's template.mode, else think)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                        help="a missing delimiter gives the answer [NULL] (default: the run's template.strict, "
                             "else on)")
    parser.add_argument("--zero-family", choices=("llama", "qwen"), default=None,
                        help="render with the paper's zero template for base models of this family "
                             "(default: the run's template.zero_family)")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt limit, longer prompts lose tokens from the left (default: the run's "
                             "data.max_prompt_tokens, else 1024)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute and weight dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--generator", default=None,
                        help="the `generator` name (default: the run dir's name, else the model dir's name)")
    parser.set_defaults(func=run)


def read_prompts(path: Path) -> list[tuple[dict, list[dict]]]:
    """(input row, prompt messages) for each row of a JSONL file or JSON list."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = [(row, messages_from_row(row, f"{path} row {number}")) for number, row in read_records(path)]
    if not rows:
        raise UserError(f"{path}: is empty, there are no prompts")
    return rows


# ------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Policy:
    """The model to sample from and what names and renders it."""

    model: Any
    tokenizer_dir: str
    run_cfg: Any  # the run's RunConfig, or None for a Hugging Face dir outside a run
    generator: str
    weights: str  # where the weights came from: a model dir, or a checkpoints dir and step (absolute)


def _hf_policy(path: Path, dtype: str, place) -> Any:
    import models

    try:
        model = models.load_pretrained(path, dtype=dtype, param_dtype=dtype, place=place)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path}: {err}") from err
    if not isinstance(model, models.CausalLM):
        raise UserError(f"--model {path}: is not a *ForCausalLM checkpoint")
    return model


def load_policy(path: Path, step: int | None, dtype: str, mesh) -> Policy:
    """A run dir (or one of its checkpoint dirs): its checkpoint; a Hugging Face dir: its weights, and the run's
    settings when it is a run's export/."""
    from rlmt_jax.run import checkpoint as ckpt
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import load_resolved
    from rlmt_jax.run.run_dir import EXPORT_DIR, checkpoint_policy, checkpoints_of, find_run_dir, policy_files

    if not path.is_dir():
        raise UserError(f"--model {path}: no such directory")
    place = mesh_lib.make_placer(mesh)
    run_dir = None if (path / "config.json").is_file() else find_run_dir(path)
    if run_dir is None:  # a Hugging Face dir, maybe a run's export/
        parent = path.resolve().parent
        run_cfg = load_resolved(parent) if (parent / "config.yaml").is_file() else None
        name = parent.name if run_cfg is not None else path.resolve().name
        return Policy(_hf_policy(path, dtype, place), str(path), run_cfg, name, str(path.resolve()))
    cfg = load_resolved(run_dir)
    source = path if path != run_dir else checkpoints_of(run_dir, cfg)
    store = ckpt.CheckpointStore(source.parent if source.name.isdigit() else source, read_only=True)
    newest = store.latest_step()
    store.close()
    if newest is None and path == run_dir and (run_dir / EXPORT_DIR / "config.json").is_file():
        export = run_dir / EXPORT_DIR
        return Policy(_hf_policy(export, dtype, place), str(export), cfg, run_dir.resolve().name,
                      str(export.resolve()))
    model = checkpoint_policy(run_dir, cfg, source, step, dtype=dtype, param_dtype=dtype, mesh=mesh)
    _, tokenizer_dir = policy_files(run_dir, cfg)
    used = step if step is not None else (int(path.name) if path.name.isdigit() else newest)
    return Policy(model, tokenizer_dir, cfg, run_dir.resolve().name, f"{source.resolve()} step {used}")


def template_from(args, run_cfg):
    """The run's template settings (or the recipe's defaults: think, strict), with the flags given on top."""
    from rlmt_jax.inputs.templates import ZERO_EOS_BY_FAMILY, TemplateSettings

    mode = args.mode or (run_cfg.template.mode if run_cfg else "think")
    strict = args.strict if args.strict is not None else (run_cfg.template.strict if run_cfg else True)
    family = args.zero_family or (run_cfg.template.zero_family if run_cfg else None)
    limit = args.max_prompt_tokens or (run_cfg.data.max_prompt_tokens if run_cfg else 1024)
    return TemplateSettings(
        mode=mode, strict=strict and mode != "none", max_prompt_tokens=limit, thinking=mode != "none",
        prompt_template="zero" if mode == "zero" or (family is not None and mode == "none") else "chat",
        zero_eos_token=ZERO_EOS_BY_FAMILY[family] if family else None,
    )


# ------------------------------------------------------------------------------------------- resuming


def read_partial(partial: Path, settings: dict, rows: list[tuple[dict, list[dict]]], output: Path) -> list[dict]:
    """The rows a previous run with the same settings finished (a torn last line is dropped); [] if none."""
    if not partial.is_file():
        return []
    lines = partial.read_bytes().split(b"\n")
    try:
        header = json.loads(lines[0])["generate"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{partial}: is not a partial file of `rlmt-jax generate`; move it away") from None
    for key in sorted(set(header) | set(settings)):
        if header.get(key) != settings.get(key):
            raise UserError(f"{partial}: the unfinished answers for {output} were made with {key}="
                            f"{header.get(key)!r}, this run has {settings.get(key)!r}: use the same settings, "
                            "or delete the partial file to start again")
    done = []
    for raw in lines[1:-1]:  # the text after the last newline is a torn line (or empty)
        try:
            done.append(json.loads(raw))
        except ValueError:
            break
    for index, row in enumerate(done):
        expected = rows[index][1][-1]["content"] if index < len(rows) else None
        if row.get("instruction") != expected:
            raise UserError(f"{partial}: row {index + 1} answers another prompt than the input's row "
                            f"{index + 1}: the input changed; delete the partial file to start again")
    return done


def _write_partial(partial: Path, settings: dict, done: list[dict]) -> None:
    """The partial file from scratch: the settings line and the finished rows (dropping a torn line)."""
    with open(partial, "w", encoding="utf-8") as f:
        f.write(json.dumps({"generate": settings}, ensure_ascii=False) + "\n")
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in done)


# ------------------------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    import jax

    from rlmt_jax.core.jsonl import write_records_atomic
    from rlmt_jax.rollout.scored import PolicyText
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.scale.compile_cache import enable_compilation_cache
    from rlmt_jax.settings.config import MeshConfig

    enable_compilation_cache()
    rows = read_prompts(Path(args.input))
    output = Path(args.output)
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = mesh_lib.make_mesh(MeshConfig())
    with mesh_lib.activation_sharding(mesh):
        policy = load_policy(Path(args.model), args.step, dtype, mesh)
    tokenizer = _tokenizer(policy, args.model)
    template = template_from(args, policy.run_cfg)
    generator = args.generator or policy.generator
    settings = _settings(args, policy, template, generator, dtype)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    batch = min(args.batch_size, len(rows))
    done = read_partial(partial, settings, rows, output)
    done = done[:len(done) // batch * batch]  # whole batches: a batch's key depends on where it starts
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_partial(partial, settings, done)

    text = PolicyText.create(tokenizer, template, policy.model.config.eos_token_id)
    answers = _Answers.create(policy, text, template, generator, batch, args, dtype, mesh)
    base_key = jax.random.key(args.seed)
    if done:
        print(f"generate: {len(done)}/{len(rows)} prompts already done in {partial}, going on", file=sys.stderr)
    with mesh_lib.activation_sharding(mesh), open(partial, "a", encoding="utf-8") as sink:
        cut = answers.write_all(rows, len(done), base_key, sink)
    if cut:
        print(f"generate: {cut} prompts were longer than {template.max_prompt_tokens} tokens and lost tokens "
              "from the left (--max-prompt-tokens)", file=sys.stderr)
    lines = partial.read_text(encoding="utf-8").splitlines()[1:]
    write_records_atomic(output, [json.loads(line) for line in lines])
    partial.unlink()
    print(f"wrote {len(lines)} answers to {output} (generator {generator!r}, weights {policy.weights})")
    return 0


def _tokenizer(policy: Policy, model_arg: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(policy.tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {model_arg}: cannot load the tokenizer in {policy.tokenizer_dir} ({err})") from err


def _settings(args: argparse.Namespace, policy: Policy, template, generator: str, dtype: str) -> dict:
    """What the answers are made with: the partial file's header, which a rerun must match to go on from it."""
    return {
        "model": policy.weights, "input": str(Path(args.input).resolve()),
        "generator": generator, "mode": template.mode, "strict": template.strict,
        "prompt_template": "zero" if template.uses_zero_template else "chat",
        "max_prompt_tokens": template.max_prompt_tokens, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "dtype": dtype,
    }


@dataclasses.dataclass(frozen=True)
class _Answers:
    """Answers prompts `batch` at a time with the sampler and writes their records."""

    sampler: Any  # rlmt_jax.rollout.sampling.Sampler, one row per prompt
    params: Any
    text: Any  # rlmt_jax.rollout.scored.PolicyText
    template: Any  # inputs.templates.TemplateSettings
    generator: str
    batch: int

    @classmethod
    def create(cls, policy: Policy, text, template, generator: str, batch: int, args: argparse.Namespace,
               dtype: str, mesh) -> _Answers:
        from flax import nnx

        from rlmt_jax.rollout.sampling import Sampler, SamplingConfig, default_prompt_buckets
        from rlmt_jax.scale import multihost

        graphdef, params = nnx.split(policy.model)
        sampler = Sampler(graphdef, SamplingConfig(
            n=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            eos_ids=text.stop_ids, pad_id=text.pad_id,
            prompt_buckets=default_prompt_buckets(template.max_prompt_tokens), cache_dtype=dtype,
        ), hosts=multihost.HostRows(mesh))
        return cls(sampler, params, text, template, generator, batch)

    def write_all(self, rows: list[tuple[dict, list[dict]]], first: int, base_key, sink) -> int:
        """Answers rows[first:] into `sink` batch by batch, flushed after each, with progress on stderr.
        -> how many prompts lost tokens from the left"""
        import jax

        total, start_time, cut = len(rows), time.perf_counter(), 0
        for start in range(first, total, self.batch):
            # each batch's key depends on where it starts only, so a resumed run samples what a whole one would
            cut += self.write(rows[start:start + self.batch], jax.random.fold_in(base_key, start), sink)
            sink.flush()
            finished = min(start + self.batch, total)
            elapsed = time.perf_counter() - start_time
            rate = (finished - first) / max(elapsed, 1e-9)
            print(f"generate: {finished}/{total} prompts ({100 * finished // total}%), {elapsed:.0f} s, "
                  f"~{(total - finished) / max(rate, 1e-9):.0f} s left", file=sys.stderr, flush=True)
        return cut

    def write(self, chunk: list[tuple[dict, list[dict]]], key, sink) -> int:
        """Samples an answer to each prompt of `chunk` and writes its record: the input row, `instruction`,
        `output` (the answer, plan removed), `generator`, `raw_output`, `plan`, `format_valid`.
        -> how many of the prompts lost tokens from the left"""
        from rlmt_jax.inputs.templates import split_output

        prompt_ids, truncated = self.text.encode([messages for _, messages in chunk])
        prompt_ids += [prompt_ids[-1]] * (self.batch - len(chunk))  # a short last batch: no new program
        rollout = self.sampler(self.params, prompt_ids, key)
        for (row, messages), raw in zip(chunk, self.text.decode_responses(rollout)):
            split = split_output(raw, self.template, self.text.eos_texts)
            sink.write(json.dumps({**row, "instruction": messages[-1]["content"], "output": split.answer,
                                   "generator": self.generator, "raw_output": raw, "plan": split.plan,
                                   "format_valid": split.valid}, ensure_ascii=False) + "\n")
        return truncated
