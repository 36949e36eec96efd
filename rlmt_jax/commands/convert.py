"""`rlmt-jax convert SRC --out DST`: rewrite a Hugging Face checkpoint through our loader and saver.

Every tensor is checked against the config (names and shapes), cast to --dtype, re-sharded to
--max-shard-size, and config.json is written in the layout the installed transformers reads; tokenizer files
are copied. Useful to validate a checkpoint before a long run, to make a bfloat16 copy, or to turn a
transformers-4 config into the transformers-5 layout. Pickle (.bin) weights are never read.
"""

from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="validate, cast and re-shard a Hugging Face checkpoint",
                                   description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="Hugging Face model directory (safetensors), or builtin:tiny-policy / "
                                       "builtin:tiny-reward")
    parser.add_argument("--out", required=True, help="directory to write (replaced only once complete)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the written weights (default: as loaded, float32)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.set_defaults(func=run)


def run(args) -> int:
    import models
    from rlmt_jax.core.errors import UserError
    from rlmt_jax.inputs.tiny import resolve_model_path

    source = resolve_model_path(args.source)
    try:
        models.check_destination(args.out)  # before the weights are read: nothing of the user's is replaced
        model = models.load_pretrained(source, param_dtype=args.dtype or "float32", dtype=args.dtype or "float32")
    except models.DestinationError as err:
        raise UserError(f"--out {err}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{args.source}: {err}") from err
    extra = [os.path.join(source, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    try:
        out = models.save_pretrained(model, args.out, max_shard_size=args.max_shard_size, extra_files=extra)
    except models.DestinationError as err:  # the folder changed meanwhile, or the disk is full: nothing written
        raise UserError(f"--out {err}") from None
    print(f"converted {args.source} ({model.config.architecture}) to {out}")
    return 0
