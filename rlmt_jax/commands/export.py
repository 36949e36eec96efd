"""`rlmt-jax export RUN_DIR_OR_CHECKPOINT --out DIR`: a run's policy as a Hugging Face directory."""

from __future__ import annotations

import os
from pathlib import Path


def register(subparsers) -> None:
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
    parser.set_defaults(func=run)


def find_run_dir(path: Path) -> Path:
    """The run dir that holds `path` (a run dir, its checkpoints dir, or a step dir): the one with config.yaml."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    from rlmt_jax.errors import UserError

    raise UserError(f"{path}: not inside a run dir (no config.yaml in it or its two parents)")


def run(args) -> int:
    from flax import nnx
    from transformers import AutoTokenizer

    from models import ModelConfig, build_model
    from rlmt_jax.checkpoint import params_only
    from rlmt_jax.config import load_resolved
    from rlmt_jax.errors import UserError
    from rlmt_jax.rollouts import PolicyText, template_settings
    from rlmt_jax.tiny import resolve_model_path
    from rlmt_jax.trainer import export_policy

    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run or checkpoint directory")
    run_dir = find_run_dir(path)
    cfg = load_resolved(run_dir)
    source = path if path != run_dir else Path(cfg.checkpoint_dir)
    params = params_only(source, args.step)

    policy_path = resolve_model_path(cfg.model.policy)
    model_cfg = ModelConfig.from_pretrained(
        policy_path, dtype=cfg.runtime.dtype, param_dtype=cfg.runtime.param_dtype,
        scan_layers=cfg.runtime.scan_layers)
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    try:
        nnx.replace_by_pure_dict(state, params)
    except (KeyError, ValueError) as err:
        raise UserError(f"the checkpoint in {source} does not match the policy {policy_path}: {err}") from err
    policy = nnx.merge(graphdef, state)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.tokenizer_path))
    text = PolicyText.create(tokenizer, template_settings(cfg), model_cfg.eos_token_id)
    out = export_policy(policy, text.tokenizer, os.fspath(args.out), dtype=args.dtype,
                        max_shard_size=args.max_shard_size)
    print(f"exported {source} to {out}")
    return 0
