"""`rlmt-jax export RUN_DIR_OR_CHECKPOINT --out DIR`: a run's policy as a Hugging Face directory."""

from __future__ import annotations

import os
from pathlib import Path


def register(subparsers) -> None:
    from rlmt_jax.commands.train import add_import_option

    parser = subparsers.add_parser(
        "export", help="write a run's policy as a Hugging Face directory",
        description="Write the policy of a run's newest checkpoint (or of one step dir, RUN_DIR/checkpoints/<step>, "
                    "or --step) as a Hugging Face directory: safetensors, config.json, generation_config.json and "
                    "the policy's tokenizer files with the chat template it was trained with.",
    )
    parser.add_argument("path", help="a run dir, its checkpoints dir, or one checkpoint step dir")
    parser.add_argument("--out", required=True,
                        help="a new folder, or an earlier export to replace (once the new one is complete); a "
                             "folder of other files, the current folder or a run dir is refused")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the exported weights (default: the run's param dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    add_import_option(parser)  # a run trained with a variant of yours: its config names it
    parser.set_defaults(func=run)


def check_out_dir(out: Path, run_dir: Path) -> None:
    """UserError unless an export may write `out` (models.check_destination), and `out` is neither a run dir
    nor a folder that holds `run_dir`: nothing of a user's is ever replaced."""
    from models import DestinationError, check_destination
    from rlmt_jax.core.errors import UserError

    given = Path(os.path.abspath(out))  # a symlink is refused as it is, not as the folder it points to
    out, run_dir = out.resolve(), run_dir.resolve()
    if out == run_dir or out in run_dir.parents:
        raise UserError(f"--out {out}: is the run dir {run_dir} or holds it; export into a new folder "
                        f"(e.g. {run_dir / 'export'})")
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        raise UserError(f"--out {out}: is a run dir; export into a new folder")
    try:
        check_destination(given)
    except DestinationError as err:
        raise UserError(f"--out {err}") from None


def run(args) -> int:
    from transformers import AutoTokenizer

    from models import DestinationError
    from rlmt_jax.algorithms import import_variants
    from rlmt_jax.core.errors import UserError
    from rlmt_jax.rollout.scored import PolicyText, template_settings
    from rlmt_jax.run.run_dir import checkpoint_policy, checkpoints_of, open_run, policy_files
    from rlmt_jax.trainer.loop import export_policy

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run or checkpoint directory")
    import_variants(args.imports)
    run_dir, cfg = open_run(path)
    check_out_dir(Path(args.out), run_dir)
    source = path if path != run_dir else checkpoints_of(run_dir, cfg)
    policy = checkpoint_policy(run_dir, cfg, source, args.step)
    _, tokenizer_dir = policy_files(run_dir, cfg)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    text = PolicyText.create(tokenizer, template_settings(cfg), policy.config.eos_token_id)
    try:
        out = export_policy(policy, text.tokenizer, os.fspath(args.out), dtype=args.dtype,
                            max_shard_size=args.max_shard_size)
    except DestinationError as err:  # the folder changed meanwhile, or the disk is full: nothing was written
        raise UserError(f"--out {err}") from None
    print(f"exported {source} to {out}")
    return 0
