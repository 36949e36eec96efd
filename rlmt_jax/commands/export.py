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
    parser.add_argument("--out", required=True, help="the directory to write (replaced only once complete)")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the exported weights (default: the run's param dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    add_import_option(parser)  # a run trained with a variant of yours: its config names it
    parser.set_defaults(func=run)


def run(args) -> int:
    from transformers import AutoTokenizer

    from rlmt_jax.algorithms import import_variants
    from rlmt_jax.errors import UserError
    from rlmt_jax.rollouts import PolicyText, template_settings
    from rlmt_jax.run_dir import checkpoint_policy, checkpoints_of, open_run, policy_files
    from rlmt_jax.trainer import export_policy

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run or checkpoint directory")
    import_variants(args.imports)
    run_dir, cfg = open_run(path)
    source = path if path != run_dir else checkpoints_of(run_dir, cfg)
    policy = checkpoint_policy(run_dir, cfg, source, args.step)
    _, tokenizer_dir = policy_files(run_dir, cfg)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = PolicyText.create(tokenizer, template_settings(cfg), policy.config.eos_token_id)
    out = export_policy(policy, text.tokenizer, os.fspath(args.out), dtype=args.dtype,
                        max_shard_size=args.max_shard_size)
    print(f"exported {source} to {out}")
    return 0
