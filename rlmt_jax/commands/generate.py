"""`rlmt-jax generate`: answers for evaluation prompts with the jitted sampler, ready for AlpacaEval 2.

--model is a run dir (its newest checkpoint, or --step; its export/ when it has no checkpoint), a run's
export/, or any Hugging Face directory. Prompts come as JSON lines or a JSON list (AlpacaEval's eval set) with
`messages`, `prompt` or `instruction`. Each is rendered with the policy's chat template (or the zero template),
sampled on the device mesh, and its plan split from the answer, with the run's template settings (mode,
strict) and lengths (data.max_prompt_tokens, rollout.max_new_tokens) unless flags say otherwise. The answer is
the text after the LAST delimiter, as the paper's evaluation scripts split (--split first: the reward worker's
split, what training scores). Every input field is kept; each row gets `instruction`, `output` (the answer,
plan removed), `generator` (the run's name), `raw_output`, `plan` and `format_valid`. An output path ending
in .json gets a JSON list of records (what AlpacaEval reads), any other JSON lines.

Rows are appended to OUTPUT.partial as they are done, so a rerun with the same output and settings goes on
after the last done row. The output file appears only when complete; the partial file is then removed.

On several hosts (a multi-host run's model: start it on every host, as `train`) every process samples its
share of each batch in lockstep, and process 0 gathers the rows in order and writes the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlmt_jax.core.errors import UserError
from rlmt_jax.core.jsonl import read_records
from rlmt_jax.inputs.templates import ANSWER_MODES, SPLITS, messages_from_row

PARTIAL_SUFFIX = ".partial"
DEFAULT_MAX_NEW_TOKENS = 4096  # outside a run (the paper's evaluation length)
BATCH_PER_PROCESS = 8  # the default --batch-size, per process
PROGRESS_STEPS = 64  # decode steps between two looks at a batch's progress (--progress-seconds)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate answers for evaluation prompts (AlpacaEval .json or JSONL)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--model", required=True,
                        help="a run dir, a run's export/, a Hugging Face model directory, or builtin:tiny-policy")
    parser.add_argument("--step", type=int, default=None, help="with a run dir: the checkpoint step (default newest)")
    parser.add_argument("--input", required=True, help="JSONL or JSON list with `messages`, `prompt` or `instruction`")
    parser.add_argument("--output", required=True, help="file to write: .json (a list of records) or JSONL")
    parser.add_argument("--mode", choices=ANSWER_MODES, default=None,
                        help="how the answer is split (default: the run's template.mode, else think)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                        help="a missing delimiter (or in think mode an empty plan) gives the answer [NULL] "
                             "(default: the run's template.strict, else on)")
    parser.add_argument("--zero-family", choices=("llama", "qwen"), default=None,
                        help="render with the paper's zero template for base models of this family "
                             "(default: the run's template.zero_family)")
    parser.add_argument("--split", choices=SPLITS, default="last",
                        help="the answer follows the last delimiter (default: the paper's evaluation) or the "
                             "first (the reward worker's split in training)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"response limit (default: the run's rollout.max_new_tokens, else "
                             f"{DEFAULT_MAX_NEW_TOKENS}, less if the model's max_position_embeddings is shorter)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt limit, longer prompts lose tokens from the left (default: the run's "
                             "data.max_prompt_tokens, else 1024)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"prompts per sampler call over all processes, a multiple of their number "
                             f"(default: {BATCH_PER_PROCESS} per process)")
    parser.add_argument("--slots", type=int, default=None,
                        help="stream each batch's prompts through this many decode slots per device (the slot "
                             "engine: a slot that finishes takes the next prompt; the same answers for the same "
                             "seed) with a --batch-size larger than the slots; default: a static batch, decoded "
                             "until its longest answer stops")
    parser.add_argument("--progress-seconds", type=float, default=30.0,
                        help="while a batch decodes, print its progress (tokens, rows done, tok/s) about this "
                             "often (default 30; 0: only after each batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute and weight dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--generator", default=None,
                        help="the `generator` name (default: the run dir's name, else the model dir's name)")
    hosts = parser.add_argument_group("several hosts (default: found from the environment, as `train` does)")
    hosts.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    hosts.add_argument("--num-processes", type=int, default=None)
    hosts.add_argument("--process-id", type=int, default=None)
    parser.set_defaults(func=run)


def check_output(output: Path) -> None:
    """UserError unless `output` (and OUTPUT.partial) can be a file: not a folder, nor under a file. Checked
    before anything is loaded."""
    for path in (output, output.with_name(output.name + PARTIAL_SUFFIX)):
        if path.is_dir():
            raise UserError(f"--output {output}: {path} is a folder; give the path of a file (.json or .jsonl)")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is a file, not a folder")


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


def load_policy(path: Path, step: int | None, dtype: str, mesh,
                before_loading: Callable[[Any, str], None] | None = None) -> Policy:
    """A run dir (or one of its checkpoint dirs): its checkpoint; a Hugging Face dir: its weights, and the run's
    settings when it is a run's export/. before_loading(run config or None, the folder of the model's
    config.json) runs before the weights are read."""
    from rlmt_jax.run import checkpoint as ckpt
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.settings.config import load_resolved
    from rlmt_jax.run.run_dir import EXPORT_DIR, checkpoint_policy, checkpoints_of, find_run_dir, policy_files

    if not path.is_dir():
        raise UserError(f"--model {path}: no such directory")
    place = mesh_lib.make_placer(mesh)
    check = before_loading or (lambda run_cfg, config_dir: None)
    run_dir = None if (path / "config.json").is_file() else find_run_dir(path)
    if run_dir is None:  # a Hugging Face dir, maybe a run's export/
        parent = path.resolve().parent
        run_cfg = load_resolved(parent) if (parent / "config.yaml").is_file() else None
        name = parent.name if run_cfg is not None else path.resolve().name
        check(run_cfg, str(path))
        return Policy(_hf_policy(path, dtype, place), str(path), run_cfg, name, str(path.resolve()))
    cfg = load_resolved(run_dir)
    source = path if path != run_dir else checkpoints_of(run_dir, cfg)
    store = ckpt.CheckpointStore(source.parent if source.name.isdigit() else source, read_only=True)
    newest = store.latest_step()
    store.close()
    if newest is None and path == run_dir and (run_dir / EXPORT_DIR / "config.json").is_file():
        export = run_dir / EXPORT_DIR
        check(cfg, str(export))
        return Policy(_hf_policy(export, dtype, place), str(export), cfg, run_dir.resolve().name,
                      str(export.resolve()))
    config_dir, tokenizer_dir = policy_files(run_dir, cfg)
    check(cfg, config_dir)
    model = checkpoint_policy(run_dir, cfg, source, step, dtype=dtype, param_dtype=dtype, mesh=mesh)
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
        zero_eos_token=ZERO_EOS_BY_FAMILY[family] if family else None, split=args.split,
    )


def prompt_limit_of(args, prompt_limit: int, config_dir: str) -> tuple[int, str | None]:
    """The prompt limit, such that an answer fits after it in the model's max_position_embeddings: a default
    that leaves no room is halved to half the context (with a note); a given --max-prompt-tokens that leaves
    none is a UserError.  -> (limit, note)"""
    positions = _max_positions(config_dir)
    if positions is None or prompt_limit < positions:
        return prompt_limit, None
    if args.max_prompt_tokens is not None:
        raise UserError(f"the prompt limit {prompt_limit} (--max-prompt-tokens) leaves no room for an answer in the "
                        f"model's max_position_embeddings {positions}: lower --max-prompt-tokens")
    fitted = max(positions // 2, 1)
    return fitted, (f"generate: --max-prompt-tokens is {fitted}, not {prompt_limit} (the default): the prompt and "
                    f"the answer must fit the model's max_position_embeddings {positions}")


def max_new_tokens_of(args, run_cfg, prompt_limit: int, config_dir: str) -> tuple[int, str | None]:
    """The response limit: --max-new-tokens, else the run's rollout.max_new_tokens, else DEFAULT_MAX_NEW_TOKENS,
    such that the prompt limit (prompt_limit_of) and it fit the model's max_position_embeddings (config.json).
    -> (limit, a note when a default was lowered to fit). UserError when a given limit does not fit."""
    positions = _max_positions(config_dir)
    room = None if positions is None else positions - prompt_limit
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if room is not None and args.max_new_tokens > room:
            raise UserError(f"--max-new-tokens {args.max_new_tokens} and the prompt limit {prompt_limit} need "
                            f"{args.max_new_tokens + prompt_limit} positions, more than the model's "
                            f"max_position_embeddings {positions}: give at most {room} (or lower --max-prompt-tokens)")
        return args.max_new_tokens, None
    default, source = ((run_cfg.rollout.max_new_tokens, "the run's rollout.max_new_tokens") if run_cfg is not None
                       else (DEFAULT_MAX_NEW_TOKENS, "the default"))
    if room is not None and default > room:
        return room, (f"generate: --max-new-tokens is {room}, not {default} ({source}): the prompt limit "
                      f"{prompt_limit} and the answer must fit the model's max_position_embeddings {positions}")
    return default, None


def _max_positions(config_dir: str) -> int | None:
    """The max_position_embeddings of the model config.json in `config_dir`, None when it has none."""
    try:
        with open(Path(config_dir) / "config.json", encoding="utf-8") as f:
            value = json.load(f).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None  # loading the model says what is wrong with it
    return int(value) if isinstance(value, int) and value > 0 else None


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
    output = Path(args.output)
    check_output(output)  # before anything is loaded
    import jax

    from rlmt_jax.core.jsonl import write_records_atomic
    from rlmt_jax.rollout.scored import PolicyText
    from rlmt_jax.scale import mesh as mesh_lib
    from rlmt_jax.scale.compile_cache import enable_compilation_cache
    from rlmt_jax.settings.config import MeshConfig

    mesh_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    enable_compilation_cache()
    main = jax.process_index() == 0
    rows = read_prompts(Path(args.input))
    batch = batch_size(args.batch_size, jax.process_count(), len(rows))
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = mesh_lib.make_mesh(MeshConfig())
    policy, tokenizer, template, max_new_tokens = _load_fitted(args, dtype, mesh, main)
    generator = args.generator or policy.generator
    settings = _settings(args, policy, template, generator, dtype, max_new_tokens)
    first = _resume(partial, settings, rows, output, batch, main)

    text = PolicyText.create(tokenizer, template, policy.model.config.eos_token_id)
    progress = _Progress(args.progress_seconds, main)
    answers = _Answers.create(policy, text, template, generator, batch, max_new_tokens, args, dtype, mesh,
                              progress)
    base_key = jax.random.key(args.seed)
    if first and main:
        print(f"generate: {first}/{len(rows)} prompts already done in {partial}, going on", file=sys.stderr)
    sink = open(partial, "a", encoding="utf-8") if main else None  # noqa: SIM115 (closed below)
    try:
        with mesh_lib.activation_sharding(mesh):
            totals = answers.write_all(rows, first, base_key, sink)
    finally:
        if sink is not None:
            sink.close()
    if not main:
        return 0
    if totals.cut:
        print(f"generate: {totals.cut} prompts were longer than {template.max_prompt_tokens} tokens and lost "
              "tokens from the left (--max-prompt-tokens)", file=sys.stderr)
    if totals.seconds > 0:
        print(f"generate: sampled {totals.tokens} tokens in {totals.seconds:.0f} s "
              f"({totals.tokens / totals.seconds:.1f} tok/s)", file=sys.stderr)
    records = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()[1:]]
    write_records_atomic(output, records)
    partial.unlink()
    print(f"wrote {len(records)} answers to {output} (generator {generator!r}, weights {policy.weights})")
    warning = no_valid_answer_warning(records, template)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def _load_fitted(args, dtype: str, mesh, main: bool):
    """The policy (--model: a run dir, an export, a HF dir or builtin:tiny-policy), its tokenizer, the template
    settings and the response limit, the lengths fitted to the model's context before its weights are read.
    -> (policy, tokenizer, template, max_new_tokens)"""
    from rlmt_jax.inputs.tiny import resolve_model_path
    from rlmt_jax.scale import mesh as mesh_lib

    lengths = {}

    def check_lengths(run_cfg, config_dir: str) -> None:  # before the weights are read
        prompt_limit, prompt_note = prompt_limit_of(args, template_from(args, run_cfg).max_prompt_tokens, config_dir)
        lengths["max_prompt_tokens"] = prompt_limit
        lengths["max_new_tokens"], note = max_new_tokens_of(args, run_cfg, prompt_limit, config_dir)
        lengths["notes"] = [line for line in (prompt_note, note) if line]  # said once the model has loaded

    model_path = resolve_model_path(args.model)
    with mesh_lib.activation_sharding(mesh):
        policy = load_policy(Path(model_path), args.step, dtype, mesh, before_loading=check_lengths)
    for note in lengths["notes"] if main else ():
        print(note, file=sys.stderr)
    template = dataclasses.replace(template_from(args, policy.run_cfg), max_prompt_tokens=lengths["max_prompt_tokens"])
    return policy, _tokenizer(policy, model_path), template, lengths["max_new_tokens"]


def batch_size(given: int | None, processes: int, prompts: int) -> int:
    """Prompts per sampler call over all processes: --batch-size (a multiple of the processes), else
    BATCH_PER_PROCESS each; no more than the prompts need (rounded up to a multiple of the processes)."""
    if given is not None and given < 1:
        raise UserError(f"--batch-size must be >= 1, got {given}")
    if given is not None and given % processes:
        raise UserError(f"--batch-size {given} must be a multiple of the {processes} processes (each samples an "
                        "equal share of every batch)")
    batch = given if given is not None else BATCH_PER_PROCESS * processes
    return min(batch, -(-prompts // processes) * processes)


def _resume(partial: Path, settings: dict, rows: list, output: Path, batch: int, main: bool) -> int:
    """How many prompts a previous run finished (whole batches: a batch's key depends on where it starts), told
    by process 0, which reads OUTPUT.partial and starts it again with those rows."""
    from rlmt_jax.scale import multihost

    done, error = [], None
    if main:
        try:
            done = read_partial(partial, settings, rows, output)
        except UserError as err:
            error = err
        done = done[:len(done) // batch * batch]
    first = multihost.process_zero_int(-1 if error is not None else len(done))  # every process, in lockstep
    if error is not None:
        raise error
    if first < 0:
        raise UserError(f"process 0 could not go on from {partial} (its error says why)")
    if main:
        output.parent.mkdir(parents=True, exist_ok=True)
        _write_partial(partial, settings, done)
    return first


def no_valid_answer_warning(records: list[dict], template) -> str | None:
    """What to say when no answer has the think (or zero) format: why, and what to do."""
    if template.mode == "none" or not records or any(r.get("format_valid") for r in records):
        return None
    delimiter = template.think_close if template.mode == "think" else template.response_open
    outputs = f"every `output` is {template.null_answer}" if template.strict else "every `output` is the whole output"
    fixes = ("use a model taught to plan first (an SFT warm-start or RLMT-trained run), the zero template for a "
             "base model (--mode zero --zero-family llama|qwen)")
    if template.strict:
        fixes += ", or --no-strict to keep the whole output as the answer"
    return (f"generate: warning: none of the {len(records)} answers has the {template.mode} format (a plan, then "
            f"{delimiter}), so {outputs}: the model was never taught that format; {fixes}")


def _tokenizer(policy: Policy, model_arg: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(policy.tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {model_arg}: cannot load the tokenizer in {policy.tokenizer_dir} ({err})") from err


def _settings(args: argparse.Namespace, policy: Policy, template, generator: str, dtype: str,
              max_new_tokens: int) -> dict:
    """What the answers are made with: the partial file's header, which a rerun must match to go on from it."""
    return {
        "model": policy.weights, "input": str(Path(args.input).resolve()),
        "generator": generator, "mode": template.mode, "strict": template.strict, "split": template.split,
        "prompt_template": "zero" if template.uses_zero_template else "chat",
        "max_prompt_tokens": template.max_prompt_tokens, "max_new_tokens": max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "dtype": dtype,
    }


class _Progress:
    """Process 0's lines on stderr while a batch decodes (the Sampler's `progress`), at most one every
    `seconds`: tokens per row so far, rows done, tokens so far, tok/s since the batch's first chunk."""

    def __init__(self, seconds: float, main: bool):
        self.seconds, self.main = seconds, main
        self.label, self.base, self.last_print = "", None, time.perf_counter()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def batch(self, label: str) -> None:
        """A batch starts (its rate is measured from its first chunk on: prefill and compiling left out)."""
        self.label, self.base = label, None

    def printed(self) -> None:
        self.last_print = time.perf_counter()

    def __call__(self, where) -> None:
        now = time.perf_counter()
        if self.base is None:
            self.base = (now, where.tokens)
        if not self.main or now - self.last_print < self.seconds:
            return
        since, tokens = self.base
        rate = f", {(where.tokens - tokens) / (now - since):.1f} tok/s" if now > since and where.tokens > tokens else ""
        print(f"generate: {self.label} decoding: {where.step}/{where.max_new_tokens} tokens a row, "
              f"{where.rows_done}/{where.rows} rows done, {where.tokens} tokens{rate}", file=sys.stderr, flush=True)
        self.last_print = now


@dataclasses.dataclass
class _Totals:
    """Over the prompts this run sampled: prompts that lost tokens, response tokens, seconds sampling."""

    cut: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Answers:
    """Answers prompts `batch` at a time (over all processes, each its equal share) with the sampler; process 0
    writes their records."""

    sampler: Any  # rlmt_jax.rollout.sampling.Sampler, one row per prompt
    params: Any
    text: Any  # rlmt_jax.rollout.scored.PolicyText
    template: Any  # inputs.templates.TemplateSettings
    generator: str
    batch: int  # prompts per sampler call over all processes
    progress: _Progress

    @classmethod
    def create(cls, policy: Policy, text, template, generator: str, batch: int, max_new_tokens: int,
               args: argparse.Namespace, dtype: str, mesh, progress: _Progress) -> _Answers:
        from flax import nnx

        from rlmt_jax.rollout.sampling import Sampler, SamplingConfig, default_prompt_buckets
        from rlmt_jax.rollout.slot_sampler import SlotSampler
        from rlmt_jax.scale import multihost

        graphdef, params = nnx.split(policy.model)
        config = SamplingConfig(
            n=1, max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            eos_ids=text.stop_ids, pad_id=text.pad_id,
            prompt_buckets=default_prompt_buckets(template.max_prompt_tokens), cache_dtype=dtype,
        )
        report = progress if progress.enabled else None
        if args.slots is not None:
            sampler = SlotSampler(graphdef, config, slots=args.slots, chunk_tokens=PROGRESS_STEPS,
                                  hosts=multihost.HostRows(mesh), progress=report)
        else:
            sampler = Sampler(graphdef, config, hosts=multihost.HostRows(mesh), progress=report,
                              progress_steps=PROGRESS_STEPS)
        return cls(sampler, params, text, template, generator, batch, progress)

    def write_all(self, rows: list[tuple[dict, list[dict]]], first: int, base_key, sink) -> _Totals:
        """Answers rows[first:] batch by batch, process 0 writing them into `sink` (None on the other processes),
        flushed after each, with progress on stderr."""
        import jax

        total, start_time, totals = len(rows), time.perf_counter(), _Totals()
        batches = -(-total // self.batch)
        for start in range(first, total, self.batch):
            self.progress.batch(f"batch {start // self.batch + 1}/{batches}")
            began = time.perf_counter()
            # each batch's key depends on where it starts only, so a resumed run samples what a whole one would
            self.write(rows, start, jax.random.fold_in(base_key, start), sink, totals)
            totals.seconds += time.perf_counter() - began
            if sink is None:
                continue
            sink.flush()
            finished = min(start + self.batch, total)
            elapsed = time.perf_counter() - start_time
            rate = (finished - first) / max(elapsed, 1e-9)
            print(f"generate: {finished}/{total} prompts ({100 * finished // total}%), {elapsed:.0f} s, "
                  f"~{(total - finished) / max(rate, 1e-9):.0f} s left", file=sys.stderr, flush=True)
            self.progress.printed()
        return totals

    def write(self, rows: list[tuple[dict, list[dict]]], start: int, key, sink, totals: _Totals) -> None:
        """Samples an answer to each prompt of this process's share of the batch at `start` (a short or empty
        share is padded: every process passes as many prompts), and process 0 writes the records of all shares
        in order: the input row, `instruction`, `output` (the answer, plan removed), `generator`, `raw_output`,
        `plan`, `format_valid`."""
        import jax
        import numpy as np

        from rlmt_jax.inputs.templates import split_output
        from rlmt_jax.scale import multihost

        share = self.batch // jax.process_count()
        low = min(start + jax.process_index() * share, len(rows))
        mine = rows[low:min(low + share, start + self.batch, len(rows))]
        prompt_ids, truncated = self.text.encode([messages for _, messages in mine or rows[start:start + 1]])
        prompt_ids += [prompt_ids[-1]] * (share - len(prompt_ids))  # a short share: no new program
        rollout = self.sampler(self.params, prompt_ids, key)
        lines = []
        for (row, messages), raw in zip(mine, self.text.decode_responses(rollout)):
            split = split_output(raw, self.template, self.text.eos_texts)
            lines.append(json.dumps({**row, "instruction": messages[-1]["content"], "output": split.answer,
                                     "generator": self.generator, "raw_output": raw, "plan": split.plan,
                                     "format_valid": split.valid}, ensure_ascii=False) + "\n")
        mine_part = {"lines": lines, "cut": truncated if mine else 0,
                     "tokens": int(np.asarray(rollout.response_lengths)[:len(mine)].sum())}
        parts = multihost.gather_bytes(json.dumps(mine_part, ensure_ascii=False).encode("utf-8"))
        for part in map(json.loads, parts):  # process 0's share, then process 1's, ...: the rows in order
            totals.cut += part["cut"]
            totals.tokens += part["tokens"]
            if sink is not None:
                sink.writelines(part["lines"])
